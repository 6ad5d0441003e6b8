"""Bounds of a model request's fields, shared by the catalog's role defaults and ``validate_spec``.

They are the intersection of what the Anthropic Messages API and the OpenAI Chat Completions
API accept, so a request valid for one tier stays valid when degradation or a fallback moves it
to a tier on the other provider.
"""

from __future__ import annotations

#: ``temperature``: Anthropic accepts 0..1, OpenAI 0..2.
TEMPERATURE_MIN = 0.0
TEMPERATURE_MAX = 1.0
#: ``stop``: OpenAI takes at most 4 sequences.
STOP_MAX = 4
STOP_MAX_CHARS = 200
#: ``messages``: turns in one request.
MESSAGES_MAX = 1000
MESSAGE_ROLES = ("user", "assistant")
#: ``response_format``: free text, or one JSON object.
RESPONSE_FORMAT_TEXT = "text"
RESPONSE_FORMAT_JSON = "json"
RESPONSE_FORMATS = (RESPONSE_FORMAT_TEXT, RESPONSE_FORMAT_JSON)
#: ``metadata``: OpenAI's bounds for its own metadata (16 pairs, 64-character keys, 512-character values).
METADATA_MAX_KEYS = 16
METADATA_KEY_MAX_CHARS = 64
METADATA_VALUE_MAX_CHARS = 512
#: ``metadata["user_id"]`` is sent as the end-user id (Anthropic ``metadata.user_id``, OpenAI
#: ``safety_identifier``): an opaque id, never a name or an address.
METADATA_USER_ID = "user_id"
USER_ID_MAX_CHARS = 64
#: ``max_tokens`` when a tier's catalog entry does not say (the Claude 4.5 models' output limit).
DEFAULT_MAX_OUTPUT_TOKENS = 64_000
#: Appended to the system prompt of a request in JSON mode (OpenAI's JSON mode also requires the
#: word "JSON" in the messages; Anthropic has no schema-free JSON mode, so the instruction is it).
JSON_INSTRUCTION = "Respond with one JSON object and nothing else."
#: ``deadline``: the providers' batch completion window — a batch is answered within 24 hours of
#: its creation (Anthropic Message Batches: ``expires_at`` is 24 h after creation; OpenAI Batch:
#: ``completion_window`` "24h", the only value it accepts). A request whose deadline is at least
#: this goes to the batch lane; a shorter one stays interactive.
BATCH_COMPLETION_WINDOW_S = 24 * 3600
#: The longest ``deadline`` accepted (a year and a day); beyond it a value is a mistake, not a plan.
DEADLINE_MAX_S = 366 * 24 * 3600
