"""The official Python SDKs (openai, anthropic) against a running kvserve:
streaming and not, with and without tools, count_tokens; every event must
parse and usage must carry real counts. Exits non-zero on the first failure.

Usage: python sdk_conformance.py BASE_URL MODEL
"""

import sys

import anthropic
import openai

TOOLS_OPENAI = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOLS_ANTHROPIC = [
    {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def run_openai(base, model):
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="any")
    msgs = [{"role": "system", "content": "Answer in one short sentence."}, {"role": "user", "content": "What is the capital of France?"}]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=16)
    check("Paris" in r.choices[0].message.content, f"openai non-stream answers: {r.choices[0].message.content!r}")
    check(r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0, f"openai usage {r.usage}")
    check(r.usage.prompt_tokens_details.cached_tokens is not None, "openai cached_tokens present")
    text, usage, finish, roles = "", None, None, 0
    for chunk in c.chat.completions.create(
        model=model, messages=msgs, max_tokens=16, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.index != 0:
                check(False, f"openai chunk index {ch.index}")
            if ch.delta.role:
                roles += 1
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    check(text == r.choices[0].message.content, "openai stream text equals non-stream text (greedy)")
    check(roles == 1 and finish == "stop", f"openai stream role once and finish {finish}")
    check(usage and usage.prompt_tokens == r.usage.prompt_tokens, f"openai stream usage {usage}")
    check(usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 1, "openai second call read from cache")
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=16, tools=TOOLS_OPENAI)
    check(r.choices[0].finish_reason in ("stop", "tool_calls", "length"), f"openai with tools: {r.choices[0].finish_reason}")
    n = 0
    for chunk in c.chat.completions.create(model=model, messages=msgs, max_tokens=16, tools=TOOLS_OPENAI, stream=True):
        n += 1
    check(n >= 2, "openai stream with tools parses")
    r = c.chat.completions.create(model="not-a-model", messages=msgs, max_tokens=4)
    check(r.model == model, f"any model name is answered by the served model: {r.model}")
    try:
        c.chat.completions.create(model=model, messages=msgs, max_tokens=0)
        check(False, "max_tokens 0 refused")
    except openai.BadRequestError as e:
        check("max_tokens" in str(e), f"openai error parsed: {e}")


def run_anthropic(base, model):
    c = anthropic.Anthropic(base_url=base, api_key="any")
    system = [{"type": "text", "text": "Answer in one short sentence.", "cache_control": {"type": "ephemeral"}}]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = c.messages.create(model=model, system=system, messages=msgs, max_tokens=16)
    check(r.content[0].type == "text" and "Paris" in r.content[0].text, f"anthropic non-stream answers: {r.content}")
    u = r.usage
    check(u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens > 10 and u.output_tokens > 0, f"anthropic usage {u}")
    with c.messages.stream(model=model, system=system, messages=msgs, max_tokens=16) as s:
        for _ in s:
            pass
        final = s.get_final_message()
    check(final.content[0].text == r.content[0].text, "anthropic stream text equals non-stream text (greedy)")
    check(final.stop_reason == r.stop_reason, f"anthropic stream stop_reason {final.stop_reason}")
    fu = final.usage
    total = u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens
    check(fu.input_tokens + fu.cache_creation_input_tokens + fu.cache_read_input_tokens == total, f"anthropic stream usage {fu}")
    check(fu.cache_read_input_tokens >= total - 1, "anthropic second call read from cache")
    n = c.messages.count_tokens(model=model, system=system, messages=msgs)
    check(n.input_tokens == total, f"count_tokens {n.input_tokens} equals the prompt {total}")
    r = c.messages.create(model=model, system=system, messages=msgs, max_tokens=16, tools=TOOLS_ANTHROPIC)
    check(r.stop_reason in ("end_turn", "tool_use", "max_tokens"), f"anthropic with tools: {r.stop_reason}")
    with c.messages.stream(model=model, system=system, messages=msgs, max_tokens=16, tools=TOOLS_ANTHROPIC) as s:
        final = s.get_final_message()
    check(final.role == "assistant", "anthropic stream with tools parses")
    history = msgs + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sunny, 21 C"}]}]},
    ]
    r = c.messages.create(model=model, system=system, messages=history, max_tokens=16, tools=TOOLS_ANTHROPIC)
    check(len(r.content) >= 1, "anthropic tool_result conversation answered")
    try:
        c.messages.create(model=model, messages=msgs, max_tokens=0)
        check(False, "max_tokens 0 refused")
    except anthropic.BadRequestError as e:
        check("max_tokens" in str(e), f"anthropic error parsed: {e}")


def main():
    base, model = sys.argv[1], sys.argv[2]
    run_openai(base, model)
    run_anthropic(base, model)
    print("all SDK checks passed")


if __name__ == "__main__":
    main()
