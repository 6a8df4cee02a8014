"""The official anthropic SDK against kvserve --proxy in front of a real
OpenAI-compatible upstream: text streamed and not, usage carried over,
upstream errors in Anthropic's shape, and an upstream that is down.

Usage: python proxy_check.py PROXY_URL DEAD_PROXY_URL MODEL
"""

import sys

import anthropic
import openai


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def main():
    url, dead, model = sys.argv[1], sys.argv[2], sys.argv[3]
    c = anthropic.Anthropic(base_url=url, api_key="any", max_retries=0)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = c.messages.create(model=model, max_tokens=16, system="Answer in one short sentence.", messages=msgs)
    check(r.content[0].type == "text" and "Paris" in r.content[0].text, f"text through the proxy: {r.content}")
    check(r.usage.input_tokens + r.usage.cache_read_input_tokens > 10 and r.usage.output_tokens > 0, f"usage {r.usage}")
    with c.messages.stream(model=model, max_tokens=16, system="Answer in one short sentence.", messages=msgs) as s:
        final = s.get_final_message()
    check(final.content[0].text == r.content[0].text, "streamed text equals the non-streamed text")
    check(final.usage.cache_read_input_tokens > 0, f"the upstream's cached tokens come back as cache reads: {final.usage}")
    tools = [{"name": "get_weather", "description": "Weather for a city.",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    history = msgs + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]},
    ]
    r = c.messages.create(model=model, max_tokens=8, messages=history, tools=tools)
    check(r.role == "assistant", "tools and tool results are translated and answered")
    try:
        c.messages.create(model="no-such-model", max_tokens=8, messages=msgs)
        check(False, "an upstream error is passed on")
    except anthropic.NotFoundError as e:
        check("not served here" in str(e), f"upstream 404 comes back as Anthropic not_found_error: {e}")
    try:
        c.messages.create(model=model, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
        check(False, "images are refused")
    except anthropic.BadRequestError as e:
        check("image" in str(e), f"images refused clearly: {e}")
    d = anthropic.Anthropic(base_url=dead, api_key="any", max_retries=0)
    try:
        d.messages.create(model=model, max_tokens=8, messages=msgs)
        check(False, "a down upstream is an error")
    except anthropic.APIStatusError as e:
        check(e.status_code == 502 and "unreachable" in str(e), f"upstream down: {e.status_code} {e}")
    o = openai.OpenAI(base_url=f"{url}/v1", api_key="any", max_retries=0)
    r = o.chat.completions.create(model=model, max_tokens=16, messages=msgs)
    check("Paris" in r.choices[0].message.content, "OpenAI requests pass through")
    print("all proxy checks passed")


if __name__ == "__main__":
    main()
