#!/usr/bin/env python3
"""`flashpack serve` tried with the official `openai` Python client.

Starts the server on a free port (`--port 0`) with the given model (default: the
fixture fixtures/chat/llama-silu-chat), then uses the client as an application
would: list models, a completion, a chat completion whole and streamed (the
streamed pieces must add up to the whole answer), usage counts, and the
client's own exceptions for an unknown model and a bad parameter. Not needed by
CI (tests/serve.rs sends the same requests without Python).

Usage:
    cargo build --release
    pip install openai
    python3 benches/serve_openai.py [MODEL]
"""

import json
import pathlib
import subprocess
import sys

import openai

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    model_path = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "fixtures/chat/llama-silu-chat")
    server = subprocess.Popen(
        [str(ROOT / "target/release/flashpack"), "serve", model_path, "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        info = json.loads(server.stdout.readline())
        print(f"server: {info['url']} serving {info['model_name']}")
        client = openai.OpenAI(base_url=info["url"] + "/v1", api_key="unused")

        models = client.models.list()
        names = [m.id for m in models.data]
        assert names == [info["model_name"]], names
        name = names[0]

        c = client.completions.create(model=name, prompt="ROMEO.", max_tokens=20, temperature=0)
        print(f"completion ({c.choices[0].finish_reason}, {c.usage.completion_tokens} tokens): {c.choices[0].text!r}")
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens

        messages = [{"role": "user", "content": "Good morrow, sir."}]
        whole = client.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0)
        answer = whole.choices[0].message.content
        print(f"chat ({whole.choices[0].finish_reason}): {answer!r}")

        pieces = []
        usage = None
        stream = client.chat.completions.create(
            model=name,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
        assert "".join(pieces) == answer, (pieces, answer)
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
        print(f"streamed: {len(pieces)} pieces, equal to the whole answer")

        try:
            client.chat.completions.create(model="gpt-4o", messages=messages)
            raise AssertionError("an unknown model was accepted")
        except openai.NotFoundError as e:
            print(f"unknown model: {e.status_code} {e.body['message']!r}")
        try:
            client.completions.create(model=name, prompt="x", temperature=5)
            raise AssertionError("temperature 5 was accepted")
        except openai.BadRequestError as e:
            print(f"bad parameter: {e.status_code} {e.body['message']!r}")
        print("ok")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
