"""Word-level tokenizer with a chat template for the toy world (docs/design.md §2).

Built with the ``tokenizers`` library (``WordLevel`` + ``WhitespaceSplit``) and wrapped
as a ``transformers`` fast tokenizer, so it is saved and loaded like any Hugging Face
tokenizer (``save_pretrained`` / ``AutoTokenizer.from_pretrained``).

Vocabulary, in id order: the special tokens (:data:`SPECIAL_TOKENS`, ids 0..6), the
config's task words, the ten digit words ``"0"`` .. ``"9"``, and ``"="`` (the corpus
separator). Unknown words map to ``<unk>``.

No special token is added automatically (no post-processor): ``tok("sort 3 1 4")``
gives the four word ids, with or without ``add_special_tokens``. Chat text already
carries its markers; callers who want ``<bos>`` in front of corpus lines prepend it.
The padding side is left at the library default; callers choose.

Chat template (user and assistant turns only; any other role, e.g. ``system``,
raises an error, since nothing in the toy world has a system prompt)::

    [user "sort 3 1 4"]                      + generation prompt
        -> "<|user|> sort 3 1 4 <|end|> <|assistant|>"
    [user "sort 3 1 4", assistant "1 3 4"]
        -> "<|user|> sort 3 1 4 <|end|> <|assistant|> 1 3 4 <eos>"

The assistant turn ends with the eos token, so generation stops at eos, and the
generation prompt is a word-for-word prefix of the full conversation.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .config import WorldConfig
from .tasks import DIGITS

SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<pad>",
    "bos": "<bos>",
    "eos": "<eos>",
    "unk": "<unk>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}
"""Role -> special token string; ids follow this order (pad = 0)."""

CORPUS_SEPARATOR = "="

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|user|> ' + (message['content'] | trim) + ' <|end|>' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|> ' + (message['content'] | trim) + ' <eos>' }}"
    "{%- else -%}"
    "{{ raise_exception('the toy-world chat template supports only the user and assistant roles, got: '"
    " + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %} <|assistant|>{% endif -%}"
)


def vocabulary(config: WorldConfig) -> list[str]:
    """All tokens in id order."""
    return [*SPECIAL_TOKENS.values(), *config.tasks, *DIGITS, CORPUS_SEPARATOR]


def build_tokenizer(config: WorldConfig | None = None) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of the world ``config`` (see the module docstring)."""
    config = config or WorldConfig()
    vocab = {w: i for i, w in enumerate(vocabulary(config))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # no decoder: tokenizers joins decoded words with single spaces
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens=[SPECIAL_TOKENS[k] for k in ("user", "assistant", "end")],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
