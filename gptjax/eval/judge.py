"""Scoring generated responses 0-100 with an LLM judge behind an OpenAI-compatible chat API.

Any server speaking POST {base}/chat/completions works: Ollama (http://localhost:11434/v1),
vLLM, llama.cpp's server or a hosted API. Only the standard library talks HTTP here, so
judging adds no dependency. Requests use temperature 0 so scores repeat where the
server allows it.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Sequence

from tqdm import tqdm

from gptjax.errors import GptjaxError
from gptjax.finetune.sft_data import RESPONSE_MARKER, format_prompt

ENDPOINT = "/chat/completions"
NOT_CONFIGURED = ("no judge endpoint configured: pass --judge-url URL (an OpenAI-compatible "
                  "API base, e.g. http://localhost:11434/v1 for Ollama) and --judge-model NAME")


@dataclass(frozen=True)
class JudgeConfig:
    url: str            # base URL ending before /chat/completions, e.g. http://localhost:11434/v1
    model: str
    api_key: str = ""   # read from the environment variable the user names (--api-key-env)
    timeout: float = 60.0


def judge_config(url: str | None, model: str | None,
                 api_key_env: str | None = None) -> JudgeConfig:
    """A JudgeConfig from CLI values. A key is sent only when the user names the variable
    holding it, so a key meant for one provider never reaches another endpoint."""
    if not url or not model:
        raise GptjaxError(NOT_CONFIGURED)
    if not url.startswith(("http://", "https://")):
        raise GptjaxError(f"judge URL must start with http:// or https://, got {url!r}")
    # A pasted full endpoint URL is taken as its base rather than doubled.
    base = url.rstrip("/").removesuffix(ENDPOINT)
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    if api_key_env and not key:
        raise GptjaxError(f"--api-key-env names ${api_key_env}, which is not set")
    return JudgeConfig(base, model, key)


def judge_prompt(record: dict, response: str) -> str:
    """The request asking the judge to grade `response` against the reference, number only."""
    task = format_prompt(record).removesuffix(RESPONSE_MARKER)
    return (
        "You are grading the answer a language model gave to a task.\n\n"
        f"The task, as the model saw it:\n<task>\n{task}\n</task>\n\n"
        f"A correct reference answer:\n<reference>\n{record['output']}\n</reference>\n\n"
        f"The model's answer:\n<answer>\n{response}\n</answer>\n\n"
        "How well does the model's answer complete the task, taking the reference as "
        "correct? Score it from 0 (wrong or unrelated) to 100 (as good as the reference). "
        "Reply with the integer score only, with no other words."
    )


# A run of digits that is not part of a decimal number ("7.5"), a negative number or
# a longer token such as "v2".
_INTEGER = re.compile(r"(?<![\w.\-])\d+(?!\.\d)(?!\w)")


def parse_score(text: str) -> int | None:
    """The first standalone integer from 0 to 100 in the judge's reply, else None."""
    for match in _INTEGER.finditer(text or ""):
        value = int(match.group())
        if value <= 100:
            return value
    return None


def score_responses(records: Sequence[dict], responses: Sequence[str], cfg: JudgeConfig, *,
                    progress: bool = True) -> list[int | None]:
    """Judge each response against its record's reference; None where no score could be read."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    scores = []
    for record, response in tqdm(list(zip(records, responses)), desc="judging",
                                 disable=not progress):
        scores.append(parse_score(_ask(cfg, judge_prompt(record, response))))
    return scores


def _ask(cfg: JudgeConfig, prompt: str) -> str:
    """One chat completion's text; any failure is a one-line GptjaxError naming the URL."""
    url = cfg.url + ENDPOINT
    body = json.dumps({"model": cfg.model, "temperature": 0,
                       "messages": [{"role": "user", "content": prompt}]}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout) as reply:
            raw = reply.read()
    except urllib.error.HTTPError as e:
        detail = _one_line(e.read().decode("utf-8", "replace"))
        raise GptjaxError(f"judge request to {url} failed: HTTP {e.code} {e.reason}"
                          + (f": {detail}" if detail else "")) from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            reason = f"timed out after {cfg.timeout:g} s"
        raise GptjaxError(f"judge request to {url} failed: {reason}") from None
    except TimeoutError:  # a reply that stalls after the connection was made
        raise GptjaxError(f"judge request to {url} failed: "
                          f"timed out after {cfg.timeout:g} s") from None
    except OSError as e:
        raise GptjaxError(f"judge request to {url} failed: {e}") from None
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise GptjaxError(f"judge at {url} did not reply with a chat completion: "
                          f"{_one_line(raw.decode('utf-8', 'replace'))}") from None
    return content if isinstance(content, str) else ""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
