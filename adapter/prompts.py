"""The prompt templates an adapter can be trained with (docs/method.md, "Instruction format"),
shared by training and serving.

A task names its template; training writes that name into the adapter file's metadata
(`prompt_template`), and serving reads it back, so the two processes never have to agree on a
rule by convention. "alpaca": Alpaca's instruction template; "raw": the text as it is (ScienceQA
trains on its own "Question: ... Answer:" text).
"""

from __future__ import annotations

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
TEMPLATES = ("alpaca", "raw")


def format_prompt(instruction: str, input: str = "") -> str:
    """The text the model sees before its response; an empty input uses the shorter template."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def render_prompt(template: str, instruction: str, input: str = "") -> str:
    """The prompt of `template` for an instruction (and its optional input)."""
    if template == "raw":
        return f"{input}\n{instruction}" if input else instruction
    if template == "alpaca":
        return format_prompt(instruction, input)
    raise ValueError(f"unknown prompt template {template!r} (known: {', '.join(TEMPLATES)})")


def template_of(extra: dict) -> str:
    """The template an adapter file says it was trained with. Files written before the name was
    recorded: ScienceQA adapters used their raw text, every other task the Alpaca template."""
    name = extra.get("prompt_template")
    if name is not None:
        if name not in TEMPLATES:
            raise ValueError(f"adapter metadata names an unknown prompt template {name!r}")
        return name
    return "raw" if extra.get("task") == "scienceqa" else "alpaca"
