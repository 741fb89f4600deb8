"""Real-model generation through gridtune's local server: aggregate tokens/s at concurrency 1, 8, 32.

    python bench/local_generation.py [--model smollm2-135m] [--tokens 128] [--json out.json]

For each concurrency C, C client threads (the real openai SDK over HTTP, as workers call it) each
send `--rounds` tutorial prompts one after another (temperature 1, a seed each); a reply ends at
the model's end of turn or at `--tokens`. Reported: wall seconds, completion tokens (from `usage`),
tokens/s and median latency. The static-batch reference runs `model.generate` on one batch of
the largest C prompts with the same limit, in this process, after the server has stopped, and
counts only the tokens before each row's end of turn (the rest is work for padding).
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = ("Imagine a complete and detailed description of a {age}-year-old {gender} fictional character who has the "
          "superpower of {power}. Write out the entire description in a maximum of 100 words in great detail:")
POWERS = ["invisibility", "read in the thoughts", "turning lead into gold", "immortality", "telepathy", "teleport",
          "flight"]


def prompt(i: int) -> str:
    return PROMPT.format(age=18 + i % 73, gender=("man", "woman")[i % 2], power=POWERS[i % 7])


def through_server(model: str, concurrencies: list[int], tokens: int, rounds: int) -> list[dict]:
    import httpx2
    import openai

    import localapi

    results = []
    with localapi.running(max_batch=max(concurrencies)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-local", max_retries=0,
                               http_client=httpx2.Client(timeout=900, limits=httpx2.Limits(max_connections=128)))

        def one(i: int) -> tuple[float, int]:
            started = time.monotonic()
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt(i)}], max_tokens=tokens, temperature=1.0,
                seed=i)
            return time.monotonic() - started, reply.usage.completion_tokens

        one(0)  # load the model (and convert it the first time) before timing
        for concurrency in concurrencies:
            count = concurrency * rounds
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                done = list(pool.map(one, range(count)))
            wall = time.monotonic() - started
            produced = sum(n for _, n in done)
            results.append({"path": "server", "concurrency": concurrency, "requests": count, "wall_s": round(wall, 1),
                            "completion_tokens": produced, "tokens_per_s": round(produced / wall, 1),
                            "median_latency_s": round(statistics.median(t for t, _ in done), 1)})
            print(json.dumps(results[-1]), flush=True)
        results.append({"path": "server", "generator_stats": server.stats()["models"]})
    return results


def static_batch(model: str, size: int, tokens: int) -> dict:
    """`model.generate` on one left-padded batch: every row runs until the longest is done."""
    import torch

    from gridtune.localmodel import resolve
    from localapi.inference import load_model

    tokenizer, net, device = load_model(resolve(model))
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt(i)}], add_generation_prompt=True,
                                           tokenize=False) for i in range(size)]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    started = time.monotonic()
    with torch.inference_mode():
        out = net.generate(**batch, max_new_tokens=tokens, do_sample=True, temperature=1.0,
                           pad_token_id=tokenizer.pad_token_id)
    wall = time.monotonic() - started
    new = out[:, batch["input_ids"].shape[1]:]
    # Tokens up to each row's end of turn: what a client would get (the rest is padding work).
    useful = sum(int((row == tokenizer.eos_token_id).nonzero()[0]) if (row == tokenizer.eos_token_id).any()
                 else len(row) for row in new)
    result = {"path": "static generate", "concurrency": size, "wall_s": round(wall, 1), "completion_tokens": useful,
              "tokens_per_s": round(useful / wall, 1)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens per reply")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client thread")
    parser.add_argument("--no-static", action="store_true", help="skip the static-batch reference")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = through_server(args.model, args.concurrency, args.tokens, args.rounds)
    if not args.no_static:
        results.append(static_batch(args.model, max(args.concurrency), args.tokens))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
