"""The plain marker format of the tiny word-level models: its tokens and the same format as a chat template.

`rendering.render_plain_state` writes states in this format; `models.tiny_lm` builds
tokenizers whose special tokens are these, with PLAIN_CHAT_TEMPLATE attached. The
format belongs to the data (how a state is written), so the model builder imports
it from here, never the reverse.
"""

from __future__ import annotations

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
CUSTOMER, AGENT, END = "<customer>", "<agent>", "<end>"
EDITED, REJECTED, ABSTAIN = "<edited>", "<rejected>", "<abstain>"
SPECIAL_TOKENS = [PAD, UNK, BOS, CUSTOMER, AGENT, END, EDITED, REJECTED, ABSTAIN]

# The marker format of rendering.render_plain_state as a chat template, so an exported
# tiny policy is deployable like any chat model: `apply_chat_template(messages,
# add_generation_prompt=True)` gives exactly the text it was trained on. Messages:
# {"role": "user", "content": customer message} and {"role": "assistant", "content":
# message sent, "suggestion": the agent's suggestion (None = abstained),
# "business_action": "accept" (default) | "edit" | "reject"}.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ('' if loop.first else ' ') + '<customer> ' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set action = message.get('business_action') or 'accept' -%}"
    "{%- set suggestion = (message.get('suggestion') if action in ['edit', 'reject'] else message['content']) or '' -%}"
    "{%- set suggestion = suggestion | trim -%}"
    "{{- ' <agent> ' + (suggestion if suggestion else '<abstain>') + ' <end>' -}}"
    "{%- if action == 'edit' -%}{{- ' <edited> ' + message['content'] -}}"
    "{%- elif action == 'reject' -%}{{- ' <rejected> ' + message['content'] -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' <agent>' -}}{%- endif -%}"
)
