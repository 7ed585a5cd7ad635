"""chat_serving: many users at once on the quickstart GGUF, in the engine and in the browser.

    .venv/bin/python -m bench.chat_serving                            # -> bench/results/chat_serving.json
    .venv/bin/python -m bench.chat_serving --baseline /path/to/checkout   # also the same browser run on another
                                                                          # checkout's `tunebook chat` (its .venv)
Targets (10 sessions x 3 messages, 2 cores): every message shows a response state within 1 s; median time to
first token <= 10 s; aggregate generated tokens/s >= 2x the serialized rate of the engine before; 0 errors;
histories isolated; no outbound connection from the server.

1. engine: --replies replies of exactly --tokens tokens each (end-of-turn banned, the chat's sampling),
   the same prompts (the run's system prompt and a vet question each) every way:
   * one at a time through llama-cpp-python's `Llama.generate`, as the chat engine before ran them (one
     model behind a lock; the same sampler chain);
   * one at a time through tunebook's engine with one sequence;
   * all submitted at once to tunebook's engine with --replies sequences (decoded together).
   Aggregate generated tokens/s = all tokens / wall time from the first submission to the last token;
   time to first token per reply from the moment all were submitted.
2. browser: `tunebook chat RUN` in its own process; --sessions Chromium sessions (each its own browser
   context, Debian's chromium through Playwright) each send --messages questions about their own pet (a
   name no other session uses), the next one as soon as the previous reply has finished, with the chat's
   default settings (temperature 0.7, top-p 0.9, at most 256 tokens). A MutationObserver in each page
   stamps when the answer area first shows text (any: the reading/waiting status, or words) and when it
   first shows words of the reply; the reply ends when the stop button gives way to the send button.
   Reply tokens are counted with the GGUF's own tokenizer. Isolation: no page shows another session's
   pet name. The server's process tree is polled for inet connections to non-loopback addresses.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import ROOT, machine, ratio, write_result

RUN = ROOT / "runs" / "quickstart"
TARGET_STATUS_S = 1.0
TARGET_MEDIAN_FIRST_TOKEN_S = 10.0
TARGET_AGGREGATE_RATIO = 2.0
STATUS = ("Reading your message", "Waiting for the model")  # chat/app.py READING, status_text()
NAMES = ["Bella", "Rocky", "Luna", "Oscar", "Daisy", "Milo", "Coco", "Toby", "Nala", "Ziggy", "Pepper", "Bruno"]
QUESTIONS = [
    "My dog {name} has vomited twice since this morning but still drinks water. Should I be worried?",
    "{name} also seems more tired than usual. Could that be related?",
    "When should I take {name} to the vet, and what should I tell them?",
]
ENGINE_QUESTIONS = [
    "My cat hasn't eaten for a day and is hiding. What could be wrong?",
    "Which common foods are poisonous to dogs and cats?",
    "What vaccinations does a new puppy need, and when?",
    "My rabbit stopped eating hay and sits hunched. Is it an emergency?",
    "How often should I trim my dog's nails?",
    "My dog keeps scratching his ears. What can cause that?",
    "Is it safe to give my cat milk?",
    "How do I know if my hamster is too cold?",
    "My parrot is plucking its feathers. Why?",
    "What should be in a first-aid kit for pets?",
    "How much exercise does a senior dog need?",
    "My kitten has diarrhoea. When should I call the vet?",
]


# --- 1. the engine ------------------------------------------------------------------------------------

def engine_side(gguf: Path, system: str | None, replies: int, tokens: int) -> dict:
    from chat import llama_runtime
    from chat.engine import ChatEngine, Sampling

    questions = (ENGINE_QUESTIONS * (replies // len(ENGINE_QUESTIONS) + 1))[:replies]
    head = [{"role": "system", "content": system}] if system else []
    together = ChatEngine(gguf, parallel=replies)
    alone = ChatEngine(gguf, parallel=1)
    prompts = [together.prepare(head + [{"role": "user", "content": q}], tokens) for q in questions]
    ban = {t: -100.0 for t in together.stop_ids}

    def settings(i):
        return Sampling(seed=i, max_tokens=tokens, logit_bias=ban)

    def summary(start: float, firsts: list[float], ends: list[float], counts: list[int]) -> dict:
        wall = max(ends) - start
        return {"aggregate_tok_s": round(sum(counts) / wall, 1), "wall_s": round(wall, 2), "tokens": sum(counts),
                "first_token_s_median": round(statistics.median(f - start for f in firsts), 2),
                "first_token_s_max": round(max(f - start for f in firsts), 2)}

    def our_engine(engine: ChatEngine, at_once: bool) -> dict:
        engine.forget_cached_prompts()
        b = engine.batcher
        b.steps, b.largest_batch, b.decode_s, b.sample_s = 0, 0, 0.0, 0.0
        start = time.perf_counter()
        if at_once:
            generations = [engine.start(p, settings(i)) for i, p in enumerate(prompts)]
            threads = [threading.Thread(target=g.reply) for g in generations]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            generations = []
            for i, p in enumerate(prompts):
                generations.append(engine.start(p, settings(i)))
                generations[-1].reply()
        b = engine.batcher
        return {**summary(start, [g.token_times[0] for g in generations], [g.token_times[-1] for g in generations],
                          [len(g.tokens) for g in generations]),
                "largest_batch": b.largest_batch, "decode_steps": b.steps,
                "decode_s": round(b.decode_s, 2), "sampling_s": round(b.sample_s, 2)}

    def llama_generate() -> dict:
        llm = llama_runtime.open_llama(gguf, n_ctx=2048, n_batch=512, n_threads=together.n_threads,
                                       n_threads_batch=together.n_threads, verbose=False)
        try:
            start, firsts, ends, counts = time.perf_counter(), [], [], []
            for i, p in enumerate(prompts):
                s = settings(i)
                llm.reset()
                llm.set_seed(s.seed)
                n = 0
                for token in llm.generate(p.tokens, temp=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                          repeat_penalty=s.repeat_penalty,
                                          logits_processor=[_ban(ban)]):
                    now = time.perf_counter()
                    if n == 0:
                        firsts.append(now)
                    n += 1
                    if n == tokens:
                        break
                ends.append(now)
                counts.append(n)
            return summary(start, firsts, ends, counts)
        finally:
            llm.close()

    rows = {}
    for name, run in (("one at a time, llama-cpp-python Llama.generate (the engine before)", llama_generate),
                      ("one at a time, tunebook engine, 1 sequence", lambda: our_engine(alone, False)),
                      (f"all at once, tunebook engine, {replies} sequences", lambda: our_engine(together, True))):
        run_once = run()
        rows[name] = run_once
        print(f"engine: {name}: {run_once}", flush=True)
    together.close()
    alone.close()
    return rows


def _ban(bias: dict[int, float]):
    import numpy as np

    ids = np.array(sorted(bias), dtype=np.int64)

    def processor(input_ids, scores):
        scores[ids] -= 100.0
        return scores

    return processor


# --- 2. the browser -----------------------------------------------------------------------------------

OBSERVER = """
(() => {
  window.__stamps = [];
  const sel = "[data-step-type='assistant_message']";
  const status = %s;
  const look = () => {
    document.querySelectorAll(sel).forEach((el, i) => {
      const text = el.innerText.trim();
      const s = window.__stamps[i] || (window.__stamps[i] = {shown: null, words: null});
      if (text && s.shown === null) s.shown = Date.now();
      if (text && !status.some(x => text.includes(x)) && s.words === null) s.words = Date.now();
    });
  };
  new MutationObserver(look).observe(document.body, {childList: true, subtree: true, characterData: true});
})();
"""


def server_tree_remote_connections(pid: int) -> list[str]:
    import psutil

    found = []
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            for c in proc.net_connections(kind="inet"):
                if c.raddr and not (c.raddr.ip.startswith("127.") or c.raddr.ip in ("::1", "::ffff:127.0.0.1")):
                    found.append(f"{proc.name()} -> {c.raddr.ip}:{c.raddr.port}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def browser_side(python: str, checkout: Path, run_dir: Path, sessions: int, messages: int, count_tokens) -> dict:
    from playwright.sync_api import sync_playwright

    from chat.serve import free_port

    chromium = shutil.which("chromium")
    if not chromium:
        sys.exit("Debian's chromium is needed: make browser")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tempfile.mktemp(prefix="chat-serving-", suffix=".log"), "wb")
    server = subprocess.Popen([python, "-m", "runner.cli", "chat", str(run_dir), "--port", str(port)], cwd=checkout,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=False)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the chat server did not start (log: {log.name})")
                time.sleep(0.5)
        names = NAMES[:sessions]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            pages = []
            for _ in names:
                page = browser.new_context(viewport={"width": 1000, "height": 800}).new_page()
                page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
                page.goto(url)
                page.wait_for_selector("#chat-input", timeout=120_000)
                page.evaluate(OBSERVER % list(STATUS))
                pages.append(page)
            sent: list[list[float]] = [[] for _ in names]
            ended: list[list[float]] = [[] for _ in names]
            remote: set[str] = set()
            busy = [False] * len(names)
            started = time.time()
            deadline = time.monotonic() + 1800
            while any(len(e) < messages for e in ended) and time.monotonic() < deadline:
                for i, page in enumerate(pages):
                    if not busy[i] and len(sent[i]) < messages:
                        page.fill("#chat-input", QUESTIONS[len(sent[i])].format(name=names[i]))
                        sent[i].append(time.time())
                        page.click("#chat-submit")
                        busy[i] = True
                    elif busy[i]:
                        n = len(sent[i])
                        done = page.evaluate(
                            "(n) => { const s = window.__stamps[n - 1];"
                            " return !!(s && s.words) && !document.querySelector('#stop-button'); }", n)
                        if done:
                            ended[i].append(time.time())
                            busy[i] = False
                remote.update(server_tree_remote_connections(server.pid))
                time.sleep(0.1)
            stamps = [page.evaluate("window.__stamps") for page in pages]
            texts = [[el.inner_text() for el in page.query_selector_all("[data-step-type='assistant_message']")]
                     for page in pages]
            bodies = [page.inner_text("body") for page in pages]
            errors = [page.locator("text=Sorry, generating a reply failed").count() for page in pages]
            browser.close()
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    rows, leaks = [], []
    for i, name in enumerate(names):
        for k in range(min(len(sent[i]), len(stamps[i] or []))):
            s = stamps[i][k] or {}
            shown, words = s.get("shown"), s.get("words")
            rows.append({"session": name, "message": k,
                         "response_state_s": None if shown is None else round(shown / 1000 - sent[i][k], 3),
                         "first_token_s": None if words is None else round(words / 1000 - sent[i][k], 3),
                         "tokens": count_tokens(texts[i][k]) if k < len(texts[i]) else 0})
        leaks += [f"{name}'s page shows {other}" for other in names if other != name and other in bodies[i]]
    complete = [r for r in rows if r["first_token_s"] is not None]
    wall = max((t for e in ended for t in e), default=started) - started
    states = [r["response_state_s"] for r in rows if r["response_state_s"] is not None]
    firsts = [r["first_token_s"] for r in complete]
    return {
        "sessions": sessions, "messages_per_session": messages, "replies": len(complete),
        "expected_replies": sessions * messages, "errors": sum(errors), "server_alive": alive,
        "response_state_s_median": round(statistics.median(states), 2) if states else None,
        "response_state_s_max": round(max(states), 2) if states else None,
        "messages_with_state_within_1s": sum(s <= TARGET_STATUS_S for s in states),
        "first_token_s_median": round(statistics.median(firsts), 2) if firsts else None,
        "first_token_s_max": round(max(firsts), 2) if firsts else None,
        "tokens": sum(r["tokens"] for r in complete), "wall_s": round(wall, 1),
        "aggregate_tok_s": round(sum(r["tokens"] for r in complete) / wall, 1) if wall > 0 else None,
        "isolation_leaks": leaks, "outbound_connections": sorted(remote), "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=RUN, help="the run directory (default runs/quickstart)")
    parser.add_argument("--replies", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per reply in the engine part (forced)")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout (with its .venv) to run the browser part on too")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from chat.llama_runtime import open_llama
    from runner.run_dir import RunDir

    run = RunDir(args.run)
    gguf = run.find_gguf()
    system = run.system_prompt()
    info = machine()
    vocab = open_llama(gguf, n_ctx=64, vocab_only=True, verbose=False)

    def count_tokens(text: str) -> int:
        return len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text.strip() else 0

    result = {"what": "many users at once: replies decoded together vs one at a time (engine), and browser sessions "
                      "against tunebook chat", "model": str(gguf.name), "machine_cpu_flags": cpu_flags()}
    if not args.skip_engine:
        result["engine"] = engine_side(gguf, system, args.replies, args.tokens)
    sides = {"tunebook chat (this checkout)": (sys.executable, ROOT)}
    if args.baseline:
        sides[f"tunebook chat ({args.baseline})"] = (str(args.baseline / ".venv" / "bin" / "python"), args.baseline)
    result["browser"] = {}
    for name, (python, checkout) in sides.items():
        res = browser_side(python, checkout, run.path.resolve(), args.sessions, args.messages, count_tokens)
        result["browser"][name] = res
        print(f"browser: {name}: " + ", ".join(f"{k} {v}" for k, v in res.items() if k != "rows"), flush=True)

    ours = result["browser"]["tunebook chat (this checkout)"]
    if "engine" in result:
        before = next(v for k, v in result["engine"].items() if "Llama.generate" in k)["aggregate_tok_s"]
        basis = "engine part: Llama.generate one at a time"
    else:
        before, basis = None, None
    if args.baseline:
        base = result["browser"][f"tunebook chat ({args.baseline})"]
        before, basis = base["aggregate_tok_s"], f"browser part on {args.baseline}"
    agg = ratio(ours["aggregate_tok_s"], before) if before else None
    result["targets"] = {
        "response_state_within_1s": {"measured": f"{ours['messages_with_state_within_1s']}/{ours['replies']}",
                                     "max_s": ours["response_state_s_max"],
                                     "met": ours["messages_with_state_within_1s"] == ours["expected_replies"]},
        "median_first_token_s": {"measured": ours["first_token_s_median"], "target": TARGET_MEDIAN_FIRST_TOKEN_S,
                                 "met": ours["first_token_s_median"] is not None
                                 and ours["first_token_s_median"] <= TARGET_MEDIAN_FIRST_TOKEN_S},
        "aggregate_vs_serialized": {"measured": agg, "target": TARGET_AGGREGATE_RATIO, "basis": basis,
                                    "met": agg is not None and agg >= TARGET_AGGREGATE_RATIO},
        "errors": {"measured": ours["errors"], "met": ours["errors"] == 0 and ours["replies"] == ours["expected_replies"]},
        "isolated": {"measured": ours["isolation_leaks"], "met": not ours["isolation_leaks"]},
        "no_outbound_connection": {"measured": ours["outbound_connections"], "met": not ours["outbound_connections"]},
    }
    vocab.close()
    path = write_result("chat_serving", result, info)
    for k, v in result["targets"].items():
        print(f"target {k}: {v}")
    print(f"wrote {path}")


def cpu_flags() -> list[str]:
    from chat import llama_runtime

    text = Path("/proc/cpuinfo").read_text()
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni"))) + [
        f"llama.cpp kernels: {llama_runtime.cpu_variant() or 'one build, no dispatch'}"]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
