"""`search_conversations`: the asking user's own conversations, by title and
message text. The sidebar's search (`selectors.sidebar_page`, filtered by
owner) is the only query: another user's text cannot come back."""

from __future__ import annotations

from typing import Any

from ..selectors import sidebar_page
from .base import Tool, ToolContext, ToolError

HITS = 5


def search(context: ToolContext, query: str) -> str:
    query = query.strip()
    if not query:
        # The sidebar reads an empty query as "everything".
        raise ToolError("the query is empty")
    # One more than shown: the conversation asking is left out (it holds the question).
    found, cursor = sidebar_page(user=context.user_id, query=query, size=HITS + 1)
    found = [conversation for conversation in found if str(conversation.pk) != context.conversation_id]
    more = cursor is not None or len(found) > HITS
    if not found:
        return f"No earlier conversation of this user mentions {query!r}."
    lines = [f"Conversations of this user mentioning {query!r}, most recent first:"]
    for number, conversation in enumerate(found[:HITS], start=1):
        line = f'{number}. "{conversation.display_title}" (last active {conversation.updated_at:%Y-%m-%d})'
        lines.append(line + (f": {conversation.snippet}" if conversation.snippet else ""))
    if more:
        lines.append(f"More conversations match; only the {HITS} most recent are shown.")
    return "\n".join(lines)


def _run(context: ToolContext, arguments: dict[str, Any]) -> str:
    return search(context, arguments["query"])


TOOL = Tool(
    name="search_conversations",
    description=(
        "Search the user's own earlier conversations (titles and messages) for a word or phrase. "
        f"Returns up to {HITS} matching conversations, most recent first, each with its title, "
        "date and a snippet around the match."
    ),
    parameters={
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "description": "The word or phrase to look for (case-insensitive, matched as written)",
                "minLength": 1,
                "maxLength": 200,
            }
        },
        "required": ["query"],
        "additionalProperties": False,
    },
    function=_run,
    timeout=5.0,
    uses_database=True,
)
