"""A fresh install gets one sensible default system prompt (and its first
version), so that no answer is ever asked for with an empty one. An install
that already has prompts gets nothing: staff chose theirs."""

from django.db import migrations

DEFAULT_PROMPT_NAME = "Assistant"
DEFAULT_PROMPT_TEXT = (
    "You are a helpful assistant. Answer clearly and concisely, and go into detail only "
    "when the question asks for it. When you are unsure or do not know, say so plainly "
    "instead of guessing. Use Markdown: short paragraphs, lists where they help, and code "
    "blocks with a language tag for code."
)


def create_default_prompt(apps, schema_editor):
    SystemPrompt = apps.get_model("conversations", "SystemPrompt")
    SystemPromptVersion = apps.get_model("conversations", "SystemPromptVersion")
    if SystemPrompt.objects.exists():
        return
    prompt = SystemPrompt.objects.create(name=DEFAULT_PROMPT_NAME, text=DEFAULT_PROMPT_TEXT, is_default=True)
    SystemPromptVersion.objects.create(prompt=prompt, number=1, text=prompt.text)


def remove_default_prompt(apps, schema_editor):
    SystemPrompt = apps.get_model("conversations", "SystemPrompt")
    Conversation = apps.get_model("conversations", "Conversation")
    # Only the one this migration made, untouched and unused.
    for prompt in SystemPrompt.objects.filter(name=DEFAULT_PROMPT_NAME, text=DEFAULT_PROMPT_TEXT):
        if not Conversation.objects.filter(prompt=prompt).exists():
            prompt.delete()


class Migration(migrations.Migration):
    dependencies = [("conversations", "0005_message_accounting")]

    operations = [migrations.RunPython(create_default_prompt, remove_default_prompt)]
