"""``phi3tune chat``: one-shot or interactive, streaming generation with the Phi-3 chat template.

Answers go to stdout (so ``phi3tune chat RUN --prompt ... > answer.txt`` works); prompts and status
go to the console (stderr). Generation is greedy and stops at ``<|end|>`` or ``<|endoftext|>``.
``--tools tools.json`` announces function schemas in the system turn exactly as training rendered them
(``phi3tune.data.tools``), so a model fine-tuned on tool calls answers with a call in the format it learned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

import torch
from rich.console import Console

from phi3tune.data.tools import function_schemas, to_phi3_messages
from phi3tune.data.validate import RowProblem
from phi3tune.errors import UsageError
from phi3tune.model import loading
from phi3tune.model.targets import load_for_inference, resolve_target

EXIT_WORDS = {"/exit", "/quit", "exit", "quit"}
RESET_WORD = "/reset"


def _streamer(tokenizer, out: TextIO):
    """A TextStreamer that writes decoded text to ``out`` as it is generated, without special tokens."""
    from transformers import TextStreamer

    class _ToStream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _ToStream(tokenizer, skip_prompt=True, skip_special_tokens=True)


def read_tools_file(path: Path) -> list[Any]:
    """The tools of a ``--tools`` file: a JSON list of OpenAI tools (or bare function schemas), one tool,
    or an object with a ``tools`` (or ``functions``) list, as in a training row.

    Raises:
        UsageError: The file cannot be read, is not JSON, or holds no valid function schema.
    """
    where = f"--tools {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it ({exc.strerror or exc}).", hint="give a JSON file of tools.") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)}).", hint="give a JSON file of tools.") from None
    if isinstance(data, dict) and isinstance(data.get("tools", data.get("functions")), list):
        data = data.get("tools", data.get("functions"))
    elif isinstance(data, dict):
        data = [data]
    schemas = function_schemas(data)
    if schemas is None or isinstance(schemas, RowProblem):
        why = schemas.reason if isinstance(schemas, RowProblem) else "it holds no tools"
        raise UsageError(f"{where}: {why}.", hint='use the training data\'s form: [{"type": "function", "function": '
                         '{"name": ..., "description": ..., "parameters": {...}}}]')
    return data


def system_with_tools(system: str | None, tools: list[Any] | None) -> str | None:
    """The system turn for ``system`` and ``tools``, rendered as training rendered a row with both."""
    if not tools:
        return system
    return to_phi3_messages([{"role": "system", "content": system}] if system else [], tools)[0]["content"]


def check_fits_context(model, n_prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that leaves no room for the answer in the model's context.

    Past ``max_position_embeddings`` a Phi-3 either fails deep inside generate or silently answers from a
    context it was never trained on; a clear refusal is better than either.

    Raises:
        UsageError: ``n_prompt_tokens + max_new_tokens`` exceeds the context length.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int) or n_prompt_tokens + max_new_tokens <= context:
        return
    room = context - n_prompt_tokens
    raise UsageError(
        f"the prompt is {n_prompt_tokens} tokens; with --max-new-tokens {max_new_tokens} that exceeds the "
        f"model's context length of {context} tokens.",
        hint=(f"lower --max-new-tokens to at most {room}, or shorten the prompt" if room > 0 else
              f"shorten the prompt to well under {context} tokens") + " (interactively: /reset starts over).",
    )


@torch.no_grad()
def generate_reply(model, tokenizer, messages: list[dict[str, str]], *, max_new_tokens: int,
                   out: TextIO | None = None) -> str:
    """Greedy-generate the assistant's next turn for ``messages``, streaming it to ``out`` if given.

    Args:
        model: A causal LM (or PeftModel) in eval mode.
        tokenizer: The Phi-3 tokenizer.
        messages: The conversation so far, ending with a user turn.
        max_new_tokens: Generation limit.
        out: A text stream to write tokens to as they come, or None.

    Returns:
        The reply text, without special tokens.

    Raises:
        UsageError: The prompt leaves no room for ``max_new_tokens`` in the model's context.
    """
    from phi3tune.model.chat_template import render_prompt

    prompt = torch.tensor([render_prompt(tokenizer, messages)], device=next(model.parameters()).device)
    check_fits_context(model, prompt.shape[1], max_new_tokens)
    output = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(loading.PHI3_STOP_IDS),
        pad_token_id=loading.PHI3_EOS_ID,
        streamer=_streamer(tokenizer, out) if out is not None else None,
    )
    return tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True).strip()


def chat_loop(model, tokenizer, *, system: str | None, max_new_tokens: int, console: Console,
              read_line: Callable[[], str] = input, out: TextIO | None = None) -> int:
    """Interactive multi-turn session until EOF or ``/exit``; ``/reset`` forgets the conversation.

    Returns:
        The number of answered turns.
    """
    out = out or sys.stdout  # looked up per call: test runners swap sys.stdout
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    turns = 0
    console.print("chat: type a message; /reset starts over, /exit or Ctrl-D quits.")
    while True:
        console.print("[bold]you>[/] ", end="")
        try:
            text = read_line()
        except EOFError:
            console.print()
            return turns
        if text.strip() in EXIT_WORDS:
            return turns
        if text.strip() == RESET_WORD:
            messages = list(start)
            console.print("(conversation reset)")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        console.print("[bold]phi3>[/] ", end="")
        try:
            reply = generate_reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, out=out)
        except UsageError as exc:  # too long for the context: say so and keep the session
            messages.pop()
            console.print(f"\n[bold red]error:[/] {exc.message}\n[yellow]hint:[/] {exc.hint}", highlight=False)
            continue
        messages.append({"role": "assistant", "content": reply})
        turns += 1


def run_chat(target: str, *, prompt: str | None = None, system: str | None = None, max_new_tokens: int = 256,
             console: Console | None = None, tools: Path | None = None) -> None:
    """``phi3tune chat``: answer ``prompt`` once, or start an interactive session.

    Args:
        target: A run dir, adapter dir, merged model dir or hub id.
        prompt: One-shot user message; None starts the interactive loop on stdin.
        system: Optional system prompt.
        max_new_tokens: Generation limit per answer.
        console: Where status lines go (answers go to stdout).
        tools: A JSON file of function schemas (see :func:`read_tools_file`), announced in the system turn.

    Raises:
        UsageError: An empty prompt, a bad tools file, a target that cannot be used, or a prompt too long for
            the context.
    """
    console = console or Console(stderr=True)
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty.", hint="give the message to answer, or leave out --prompt to chat interactively.")
    system = system_with_tools(system, read_tools_file(tools) if tools is not None else None)
    resolved = resolve_target(target)
    device = loading.device_type()
    what = f"adapter {resolved.path} on {resolved.base}" if resolved.kind == "adapter" else f"model {resolved.path}"
    console.print(f"loading {what} ({device})", highlight=False)
    model, tokenizer = load_for_inference(resolved, device=device)
    if prompt is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        generate_reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, out=sys.stdout)
        return
    chat_loop(model, tokenizer, system=system, max_new_tokens=max_new_tokens, console=console)
