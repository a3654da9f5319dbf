"""One way to show money everywhere (the page, the usage page, the admin,
the terminal client): the site's currency sign, at least two decimals, at
most six (model calls cost fractions of a cent), trailing zeros dropped.
`static/js/chat.js` formats the same way (`formatMoney`)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django.conf import settings

DECIMALS = 6


def money(value: object) -> str:
    try:
        amount = Decimal(str(value if value is not None else 0))
    except (InvalidOperation, ValueError):
        return str(value)
    sign = "-" if amount < 0 else ""
    text = f"{abs(amount):.{DECIMALS}f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{sign}{settings.CHAT_CURRENCY}{whole}.{fraction.ljust(2, '0')}"
