"""Python's answers for a tokenizer directory: ids from `tokenizers` for
tricky strings, and chat renders from Hugging Face's jinja2 template code
(system messages, tools, tool calls and results, thinking).

Usage: python tokenizer_reference.py TOKENIZER_DIR OUT.json
"""

import json
import sys

from tokenizers import Tokenizer
from transformers import AutoTokenizer

TRICKY = [
    "Hello, world!",
    "The year 2026 has 365 days; π ≈ 3.14159.",
    "def f(x):\n    return x**2  # square\n\ttabbed",
    "fn main() { println!(\"{}\", vec![1, 2, 3].iter().sum::<i32>()); }",
    "emoji: 🦀🚀 and a family 👨‍👩‍👧",
    "中文，日本語のテキスト、한국어",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<think>\nplan\n</think>\n\n<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "   leading and trailing spaces   ",
    "naïve café résumé — “quotes” ‘single’",
    "12345678901234567890",
    "line\r\nwindows\u00a0nbsp\u200bzero-width",
    "",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file — returns its text (UTF-8, “as is”).",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Absolute path"},
                    "limit": {"type": "integer", "minimum": 1},
                    "flags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
                },
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a shell command <safely> & return output",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
        },
    },
]

CASES = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "List 3 colors."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "Show me main.rs"},
        ],
        "tools": TOOLS,
    },
    {
        "messages": [
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "Show me main.rs"},
            {
                "role": "assistant",
                "content": "Reading it.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "read_file", "arguments": {"path": "/src/main.rs", "limit": 10}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "fn main() {}\n"},
            {"role": "system", "content": "Reminder: be brief."},
            {"role": "user", "content": "Thanks, now run it"},
        ],
        "tools": TOOLS,
    },
    {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
            {"role": "user", "content": "3+3?"},
        ],
        "enable_thinking": False,
    },
    {"messages": [{"role": "user", "content": "Think: 7*6?"}], "enable_thinking": True},
]


def main():
    path, out = sys.argv[1], sys.argv[2]
    raw = Tokenizer.from_file(f"{path}/tokenizer.json")
    hf = AutoTokenizer.from_pretrained(path)
    renders = []
    for case in CASES:
        kwargs = {}
        if "enable_thinking" in case:
            kwargs["enable_thinking"] = case["enable_thinking"]
        text = hf.apply_chat_template(
            case["messages"], tools=case.get("tools"), add_generation_prompt=True, tokenize=False, **kwargs
        )
        renders.append({**case, "text": text})
    ref = {
        "encodings": [{"text": s, "ids": raw.encode(s, add_special_tokens=False).ids} for s in TRICKY],
        "renders": renders,
    }
    with open(out, "w") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
