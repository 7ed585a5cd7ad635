"""gguf_inference: llama-cpp-python Q8_0 prompt and generation tokens/s versus transformers `generate` on
the merged model, same prompt and token count; and generation against the memory-bandwidth bound (weight
bytes per token / bandwidth measured in the same run).
Targets: GGUF generation >= 5x transformers and >= 60% of the bandwidth bound on an AVX-512 machine.

    .venv/bin/python bench/gguf_inference.py            # -> bench/results/gguf_inference.json
    .venv/bin/python bench/gguf_inference.py --rounds 2 --tokens 64   # quicker

What runs (in this one process but for the OMP_WAIT_POLICY variant, on a copy of runs/quickstart's GGUF and
merged model in a temp dir):
  * the prompt: the vet stage's system prompt and a long vet question through the model's chat template
    (the template embedded in the GGUF, as tunebook's chat renders it), a few hundred tokens. Both sides
    get the very same token ids (llama.cpp's tokenization of the rendered prompt).
  * llama.cpp: `chat.engine.ChatEngine` as `tunebook chat` builds it (n_ctx 2048, 8 sequences, n_threads =
    the cores this process may use, n_batch = n_ubatch = 512), one reply alone, greedy; the targets are
    judged on this one. Variants: the chat's own sampling settings (temperature 0.7, top-p 0.9, top-k 40,
    repeat penalty 1.1); the same engine in a fresh process with OMP_WAIT_POLICY=PASSIVE (llama.cpp's
    OpenMP threads sleep at barriers instead of spinning); n_threads=1; n_batch=64 (prompt only: 8 tokens
    a run). The cached prompt is dropped before each run; end-of-turn is banned, so every run makes
    exactly --tokens tokens. The CPU kernels llama.cpp loaded (its runtime-dispatched variant) are recorded.
  * transformers: `AutoModelForCausalLM.from_pretrained(merged)` with no dtype argument (what a user
    gets: the merged folder is float32, so float32), and the same in bfloat16; greedy `generate` with
    min_new_tokens = max_new_tokens = --tokens (EOS masked), torch's default threads; and float32 on 1 thread.
  * timing, same for both: a timestamp when each new token is available (llama: each yield of
    `generate`; transformers: a logits processor, called once per step). Prompt tokens/s = prompt tokens /
    time to the first token (prefill + one sampling); generation tokens/s = (N-1) / (time of token N -
    time of token 1), i.e. N-1 single-token decode steps.
  * alternation: every round runs every setting once, in forward order on even rounds and reversed on odd
    rounds, and measures the memory bandwidth again; the table gives each setting's best round (the least
    disturbed by the other jobs on this shared machine) and the median. Ratios are best against best.
  * the bound: bytes read per generated token = all GGUF tensor data, except that an untied token
    embedding table counts one row (a lookup); Gemma ties the output head to the embedding, so here the
    whole table is read for the logits and counts in full. Bound tokens/s = read bandwidth / bytes per
    token. Read bandwidth: bench.common.memory_bandwidth_gbs (a torch float32 sum) on 1 and
    on 2 threads, best over all rounds. A second, tighter bound adds the f16 KV
    cache read at the mean context length of the decode steps.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, in_child, machine, memory_bandwidth_gbs, ratio, write_result

RUN = ROOT / "runs" / "quickstart"
TARGET_VS_TRANSFORMERS = 5.0
TARGET_BOUND_FRACTION = 0.60  # on an AVX-512 machine
CHAT = "llama.cpp Q8_0, chat settings (n_threads = cores, n_batch 512, 8 sequences), greedy"
HF = "transformers generate, default load, greedy"

SYSTEM = ("You are VetAI, a careful assistant for pet owners. Give practical, accurate guidance on pet health "
          "and care, say clearly when an animal needs a veterinarian and when it is an emergency, and never give "
          "medication doses: those come from the animal's own veterinarian.")
QUESTION = (
    "I have a nine-year-old female Labrador retriever, about 32 kg, spayed, fully vaccinated, and on a "
    "senior dry food twice a day. Over the last three weeks she has been drinking much more water than "
    "usual: I refill her bowl three or four times a day where it used to be once, and she has started asking "
    "to go out at night, which she never did. Twice she has had an accident on the kitchen floor, and the "
    "urine looked very pale, almost like water. Her appetite is still good, maybe even bigger than before, "
    "but I think she has lost a little weight along her back and hips. She seems a bit more tired on our "
    "walks and lies down sooner after playing fetch. There has been no vomiting, the stools are normal, and "
    "her gums look pink to me. She had a dental cleaning last spring and her blood tests were normal then. "
    "We have not changed her food or treats, and nobody in the house uses any new cleaning products or "
    "garden chemicals. A neighbour said it is probably just the warm weather and her age, but the weather has "
    "cooled down this week and she is still drinking just as much. What could be causing the extra thirst "
    "and urination in an older dog like her, which signs would mean I should go to an emergency clinic "
    "tonight rather than wait, what will the vet probably check at the appointment, and what should I write "
    "down or bring with me so the visit is as useful as possible?"
)


# --- pure computations (tested in tests/test_bench_inference_export.py) -------------------------------

def bytes_per_token(tensors: list[tuple[str, int, tuple[int, ...]]]) -> int:
    """Weight bytes a decode step reads: every tensor once, except that the token embedding table is a
    row lookup (one row) unless the output head is tied to it (no `output.weight`), in which case the
    logits read it whole (and the lookup's row is part of that). `tensors`: (GGUF name, bytes, GGUF shape
    with the row length first, as GGUFReader gives it)."""
    names = {name for name, _, _ in tensors}
    tied = "output.weight" not in names
    total = 0
    for name, n_bytes, shape in tensors:
        if name == "token_embd.weight" and not tied:
            n_rows = math.prod(shape[1:]) or 1
            total += n_bytes // n_rows
        else:
            total += n_bytes
    return total


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, key_length: int, value_length: int, context: float,
                       sliding_window: int | None = None, sliding_layers: list[bool] | None = None,
                       bytes_per_element: int = 2) -> float:
    """KV cache bytes one decode step reads at `context` cached tokens (f16 cache: 2 bytes an element);
    a sliding-window layer reads at most `sliding_window` of them."""
    total = 0.0
    for layer in range(n_layers):
        sliding = bool(sliding_layers and layer < len(sliding_layers) and sliding_layers[layer])
        seen = min(context, sliding_window) if sliding and sliding_window else context
        total += seen * n_kv_heads * (key_length + value_length) * bytes_per_element
    return total


def bound_tokens_per_s(bytes_read_per_token: float, bandwidth_gbs: float) -> float:
    """The most tokens per second a decode that streams `bytes_read_per_token` can make at this bandwidth."""
    return bandwidth_gbs * 1e9 / bytes_read_per_token if bytes_read_per_token > 0 else float("inf")


def bound_fraction(measured_tokens_per_s: float, bound: float) -> float:
    return round(measured_tokens_per_s / bound, 3) if bound > 0 else float("nan")


def rates(t_start: float, stamps: list[float], n_prompt: int) -> dict:
    """Prompt and generation tokens/s from the start time and the time each generated token was ready."""
    first = stamps[0] - t_start
    gen = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else float("nan")
    return {"prompt_tok_s": n_prompt / first if first > 0 else float("nan"), "gen_tok_s": gen,
            "time_to_first_token_s": first, "n_generated": len(stamps)}


# --- measurements -------------------------------------------------------------------------------------

def gguf_facts(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = [(t.name, int(t.n_bytes), tuple(int(x) for x in t.shape)) for t in reader.tensors]

    def field(key):
        f = reader.fields.get(key)
        if f is None:
            return None
        values = [f.parts[i].tolist() for i in f.data]
        values = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]
        return values if len(values) > 1 else values[0]

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    pattern = field(f"{arch}.attention.sliding_window_pattern")
    return {
        "tensors": tensors, "arch": arch, "file_bytes": path.stat().st_size,
        "tied_output": "output.weight" not in {n for n, _, _ in tensors},
        "n_layers": field(f"{arch}.block_count"), "n_kv_heads": field(f"{arch}.attention.head_count_kv"),
        "key_length": field(f"{arch}.attention.key_length"), "value_length": field(f"{arch}.attention.value_length"),
        "sliding_window": field(f"{arch}.attention.sliding_window"),
        "sliding_layers": [bool(x) for x in pattern] if isinstance(pattern, list) else None,
    }


class Stamps:
    """A transformers logits processor that records when each step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_llama(engine, prompt: list[int], n_tokens: int, sampling: str) -> dict:
    """One reply of exactly n_tokens through the chat engine (end-of-turn banned), its prompt read in full."""
    from chat.engine import Prompt, Sampling

    engine.forget_cached_prompts()  # no prompt-cache reuse between rounds
    ban = {t: -100.0 for t in engine.stop_ids}
    if sampling == "greedy":
        settings = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=n_tokens, logit_bias=ban)
    else:  # the chat's own settings (chat.engine.Sampling defaults)
        settings = Sampling(seed=0, max_tokens=n_tokens, logit_bias=ban)
    start = time.perf_counter()
    generation = engine.start(Prompt(tokens=prompt, messages=[], max_tokens=n_tokens), settings)
    generation.reply()
    return {**rates(start, generation.token_times, len(prompt)), "tokens": generation.tokens}


def run_transformers(model, prompt: list[int], n_tokens: int, threads: int | None = None) -> dict:
    import torch

    ids = torch.tensor([prompt])
    stamps = Stamps()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                                 min_new_tokens=n_tokens, do_sample=False, top_p=None, top_k=None,
                                 temperature=None, logits_processor=[stamps])
    finally:
        torch.set_num_threads(before)
    tokens = out[0, len(prompt):].tolist()
    return {**rates(start, stamps.times, len(prompt)), "tokens": tokens}


def llama_child(gguf_path: str, prompt: list[int], n_tokens: int, n_threads: int) -> dict:
    """One greedy run in a fresh process (after an untimed warm-up), for settings read at process start."""
    from chat.engine import DEFAULT_PARALLEL, ChatEngine

    engine = ChatEngine(gguf_path, n_threads=n_threads, parallel=DEFAULT_PARALLEL)
    run_llama(engine, prompt, 8, "greedy")
    res = run_llama(engine, prompt, n_tokens, "greedy")
    engine.close()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run (forced)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the transformers bfloat16 side")
    args = parser.parse_args()

    gguf_file, merged = RUN / "quickstart-q8_0.gguf", RUN / "merged"
    if not gguf_file.is_file() or not (merged / "model.safetensors").is_file():
        sys.exit(f"{RUN} has no finished export ({gguf_file.name} and merged/ are needed): run `make demo` first")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from chat import llama_runtime
    from chat.engine import DEFAULT_PARALLEL, ChatEngine, default_threads

    hf_logging.set_verbosity_error()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        tmp = Path(tmp)
        shutil.copy2(gguf_file, tmp / gguf_file.name)
        shutil.copytree(merged, tmp / "merged")
        facts = gguf_facts(tmp / gguf_file.name)

        threads = default_threads()
        path = tmp / gguf_file.name
        chat_engine = ChatEngine(path, parallel=DEFAULT_PARALLEL)  # what `tunebook chat` builds
        prompt = chat_engine.tokenize_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
        one_thread = ChatEngine(path, n_threads=1, parallel=DEFAULT_PARALLEL) if threads != 1 else None
        small_batch = ChatEngine(path, n_batch=64, parallel=DEFAULT_PARALLEL)
        hf_fp32 = AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()  # no dtype: what a user gets
        user_dtype = str(hf_fp32.dtype).replace("torch.", "")
        hf_bf16 = None if args.no_bf16 else AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.bfloat16).eval()
        hf_prompt = AutoTokenizer.from_pretrained(tmp / "merged").apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
            add_generation_prompt=True, tokenize=True)
        hf_prompt = hf_prompt["input_ids"] if hasattr(hf_prompt, "keys") else hf_prompt

        def passive(n):
            # A fresh process: OpenMP reads OMP_WAIT_POLICY once, when llama.cpp's runtime loads.
            old = os.environ.get("OMP_WAIT_POLICY")
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            try:
                return in_child(llama_child, str(path), prompt, n, threads)
            finally:
                os.environ.pop("OMP_WAIT_POLICY") if old is None else os.environ.__setitem__("OMP_WAIT_POLICY", old)

        # (name, run(n_tokens) -> rates, tokens per run: None = --tokens; a prompt-only setting makes 8)
        sides = [
            (CHAT, lambda n: run_llama(chat_engine, prompt, n, "greedy"), None),
            ("llama.cpp Q8_0, chat settings, chat sampling (temp 0.7, top-k 40, top-p 0.9, repeat 1.1)",
             lambda n: run_llama(chat_engine, prompt, n, "chat"), None),
            ("llama.cpp Q8_0, chat settings, OMP_WAIT_POLICY=PASSIVE (own process), greedy", passive, None),
        ]
        if one_thread is not None:
            sides.append(("llama.cpp Q8_0, n_threads=1, greedy", lambda n: run_llama(one_thread, prompt, n, "greedy"), None))
        sides.append(("llama.cpp Q8_0, n_batch=64 (prompt only)", lambda n: run_llama(small_batch, prompt, n, "greedy"), 8))
        sides.append((HF, lambda n: run_transformers(hf_fp32, prompt, n), None))
        if hf_bf16 is not None:
            sides.append(("transformers generate, bfloat16", lambda n: run_transformers(hf_bf16, prompt, n), None))
        if torch.get_num_threads() != 1:
            sides.append((f"transformers generate, {user_dtype}, 1 thread",
                          lambda n: run_transformers(hf_fp32, prompt, n, threads=1), None))

        for name, run, _ in sides:  # warm-up, untimed: first-touch page faults, thread pools
            if "PASSIVE" not in name:
                run(8)
        runs = {name: [] for name, _, _ in sides}
        bandwidth = {"torch_1t": [], "torch_2t": []}
        for r in range(args.rounds):
            for name, run, n in (sides if r % 2 == 0 else sides[::-1]):
                res = run(n or args.tokens)
                runs[name].append(res)
                print(f"round {r}: {name}: prompt {res['prompt_tok_s']:.0f} tok/s, gen {res['gen_tok_s']:.1f} tok/s",
                      flush=True)
            bandwidth["torch_1t"].append(memory_bandwidth_gbs(1, seconds=1.0))
            bandwidth["torch_2t"].append(memory_bandwidth_gbs(2, seconds=1.0))
            print(f"round {r}: read bandwidth GB/s: " + ", ".join(f"{k} {v[-1]}" for k, v in bandwidth.items()), flush=True)
        prompt_only = {name for name, _, n in sides if n is not None}

    bw_best = {k: max(v) for k, v in bandwidth.items()}
    bw = max(bw_best.values())
    per_token = bytes_per_token(facts["tensors"])
    bound = bound_tokens_per_s(per_token, bw)

    table = {}
    for name, results in runs.items():
        gen = [x["gen_tok_s"] for x in results]
        pro = [x["prompt_tok_s"] for x in results]
        row = {"prompt_tok_s_best": round(max(pro), 1), "prompt_tok_s_median": round(statistics.median(pro), 1),
               "prompt_tok_s_rounds": [round(x, 1) for x in pro]}
        if name not in prompt_only:
            row |= {"gen_tok_s_best": round(max(gen), 1), "gen_tok_s_median": round(statistics.median(gen), 1),
                    "gen_tok_s_rounds": [round(x, 1) for x in gen]}
        table[name] = row
    mean_ctx = len(prompt) + args.tokens / 2
    kv = kv_bytes_per_token(facts["n_layers"], facts["n_kv_heads"], facts["key_length"], facts["value_length"],
                            mean_ctx, facts["sliding_window"], facts["sliding_layers"])
    bound_kv = bound_tokens_per_s(per_token + kv, bw)
    base = table[HF]
    for name, row in table.items():
        row["prompt_vs_transformers_default"] = ratio(row["prompt_tok_s_best"], base["prompt_tok_s_best"])
        if "gen_tok_s_best" in row:
            row["gen_vs_transformers_default"] = ratio(row["gen_tok_s_best"], base["gen_tok_s_best"])
            if name.startswith("llama.cpp"):
                row["fraction_of_bandwidth_bound"] = bound_fraction(row["gen_tok_s_best"], bound)
                row["fraction_of_bound_with_kv"] = bound_fraction(row["gen_tok_s_best"], bound_kv)
    gg = table[CHAT]
    best_llama = max((n for n in table if n.startswith("llama.cpp") and "gen_tok_s_best" in table[n]),
                     key=lambda n: table[n]["gen_tok_s_best"])
    same_tokens = runs[CHAT][0]["tokens"] == runs[HF][0]["tokens"]
    gen_ratio = gg["gen_vs_transformers_default"]
    frac = gg["fraction_of_bandwidth_bound"]
    result = {
        "what": "llama-cpp-python Q8_0 vs transformers generate on the merged model: prompt and generation tokens/s, "
                "and generation against the memory-bandwidth bound",
        "model": "runs/quickstart (Gemma 3 270M + LoRA, merged)",
        "prompt_tokens": len(prompt), "generated_tokens": args.tokens, "rounds": args.rounds,
        "hf_template_gives_same_prompt_ids": list(hf_prompt) == list(prompt),
        "greedy_tokens_identical_llama_vs_transformers_default": same_tokens,
        "llama_cpp_kernels": {"variant": llama_runtime.cpu_variant(), "built": llama_runtime.built_variants(),
                              "system_info": llama_runtime.system_info().strip()},
        "transformers_default_dtype": user_dtype, "transformers_default_is": f"from_pretrained(merged) without dtype -> {user_dtype}", "llama_threads": threads, "torch_threads": torch.get_num_threads(),
        "table": table,
        "bandwidth_gbs_best": bw_best, "bandwidth_gbs_rounds": bandwidth, "bandwidth_gbs_used": bw,
        "gguf": {"file_bytes": facts["file_bytes"], "tensor_bytes": sum(b for _, b, _ in facts["tensors"]),
                 "tied_output": facts["tied_output"], "bytes_per_token": per_token,
                 "kv_bytes_per_token_at_mean_context": round(kv), "mean_context": mean_ctx},
        "bound_tok_s": round(bound, 1), "bound_with_kv_tok_s": round(bound_kv, 1),
        "targets": {
            "gen_vs_transformers": {"measured": gen_ratio, "target": TARGET_VS_TRANSFORMERS,
                                    "met": gen_ratio >= TARGET_VS_TRANSFORMERS},
            "fraction_of_bandwidth_bound": {"measured": frac, "target": TARGET_BOUND_FRACTION,
                                            "met": frac >= TARGET_BOUND_FRACTION},
            "measured_on": CHAT,
            "best_llama_setting": {"name": best_llama, "gen_vs_transformers": table[best_llama]["gen_vs_transformers_default"],
                                   "fraction_of_bandwidth_bound": table[best_llama]["fraction_of_bandwidth_bound"]},
        },
    }
    path = write_result("gguf_inference", result, info)
    print(f"bytes/token {per_token / 1e6:.1f} MB, bandwidth {bw} GB/s -> bound {bound:.1f} tok/s "
          f"({bound_kv:.1f} with KV reads)")
    for name, row in table.items():
        print(f"{name}: prompt {row['prompt_tok_s_best']} tok/s (x{row['prompt_vs_transformers_default']})"
              + (f", gen {row['gen_tok_s_best']} (median {row['gen_tok_s_median']}) tok/s, "
                 f"x{row['gen_vs_transformers_default']} vs transformers" if "gen_tok_s_best" in row else "")
              + (f", {row['fraction_of_bandwidth_bound']:.0%} of bound" if "fraction_of_bandwidth_bound" in row else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
