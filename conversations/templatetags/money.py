from __future__ import annotations

from django import template

from conversations.money import money as format_money

register = template.Library()


@register.filter
def money(value: object) -> str:
    """`{{ cost|money }}`: see conversations/money.py."""
    return format_money(value)
