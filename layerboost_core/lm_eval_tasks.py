"""Offline lm-eval tasks generated from held-out text, and lm-eval scoring of an in-memory (patched) model.

Three tasks ship with the project and need no network; each is a JSONL file plus a YAML config that
lm-eval's `TaskManager(include_path=...)` reads (`dataset_path: json`, absolute `data_files`):

- `lb_cloze`: LAMBADA-style last word. A held-out passage (about 100-300 tokens) ends just before the last
  word of a sentence; the word must also occur earlier in the passage, so predicting it rewards using the
  whole context. Scored like lambada: `loglikelihood`, accuracy = the word is the greedy continuation.
- `lb_passkey`: a 5-digit pass key hidden at a random depth in held-out filler text of a set token length,
  asked for at the end. Multiple choice among 5 keys that share their first four digits, so chance is 20%
  and, as the keys differ only in their last token, lm-eval scores all five with ONE forward pass (it
  groups requests by context + continuation[:-1]). The model still has to find the key far back in the
  context to tell the last digit apart.
- `lb_mqar`: multi-query associative recall. K "person lives in city" pairs, a few answered queries, then
  one scored query; multiple choice among the K cities of the context (chance 1/K). Cities are chosen to be
  single tokens where the tokenizer allows, which again makes scoring one forward pass per example.

Everything is deterministic from the settings' seed, the documents and the tokenizer; the task folder is
named by a hash of those, so the same inputs reuse the same files. Files are written atomically one by one
(a manifest last), so concurrent writers of the same folder (Ray workers) never expose a partial file.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import random
import re
from functools import lru_cache
from pathlib import Path

from .cache_dir import cache_root, content_hash, write_text
from .errors import UserError, did_you_mean

log = logging.getLogger(__name__)

OFFLINE_TASKS = ("lb_cloze", "lb_passkey", "lb_mqar")
FORMAT_VERSION = 1  # bump when the generated text or YAML changes: it is part of the folder hash
DEFAULT_SETTINGS = {"n_examples": 40, "passkey_context": 1024, "mqar_pairs": 8, "cloze_context": 200, "seed": 0}
_MINIMUM = {"n_examples": 1, "passkey_context": 64, "mqar_pairs": 2, "cloze_context": 16, "seed": 0}
MANIFEST = "manifest.json"

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.\n\n")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
PASSKEY_CHOICES = 5

MQAR_INTRO = "Remember where each person lives.\n"
MQAR_PAIR = "{key} lives in {value}.\n"
MQAR_QUERY = "Question: Where does {key} live?\nAnswer: {key} lives in"
MQAR_ANSWERED = 2  # answered queries before the scored one: they show the format to a small model
_NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Laura", "Mark",
          "Nina", "Oscar", "Paula", "Quinn", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Xavier", "Yara", "Zoe",
          "Alice", "Bruno", "Clara", "Daniel", "Elena", "Felix", "Hugo", "Isabel", "James", "Kevin", "Linda",
          "Martin", "Olivia", "Peter", "Rachel", "Simon", "Thomas", "Ursula", "Walter", "Sophie", "Lucas",
          "Maria", "Nathan", "George", "Helen", "Julia")
_CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Moscow", "Cairo", "Sydney", "Dublin",
           "Vienna", "Prague", "Boston", "Chicago", "Toronto", "Seoul", "Beijing", "Delhi", "Lima", "Oslo",
           "Athens", "Lisbon", "Warsaw", "Munich", "Mumbai", "Dallas", "Denver", "Miami", "Atlanta", "Houston",
           "Istanbul", "Bangkok", "Singapore", "Amsterdam", "Brussels", "Stockholm", "Helsinki", "Budapest",
           "Venice", "Milan", "Geneva", "Zurich", "Montreal", "Vancouver", "Seattle", "Phoenix", "Melbourne",
           "Manila", "Nairobi", "Havana")

_SENTENCE_END_WORD = re.compile(r"(?<![\w'-])([A-Za-z]{4,})[.!?]['\"]?(?=\s|$)")
_WORD = re.compile(r"\S+")


# ---------------------------------------------------------------- settings and identity

def resolve_settings(settings: dict | None) -> dict:
    """The defaults overlaid with `settings`; unknown keys and out-of-range values are refused."""
    resolved = dict(DEFAULT_SETTINGS)
    for key, value in (settings or {}).items():
        if key not in DEFAULT_SETTINGS:
            raise UserError(f"eval: unknown offline-task setting {key!r}; {did_you_mean(key, DEFAULT_SETTINGS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < _MINIMUM[key]:
            raise UserError(f"eval.{key}: {value!r} must be an integer >= {_MINIMUM[key]}")
        resolved[key] = value
    return resolved


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _tokenizer_id(tokenizer) -> str:
    """What of the tokenizer the generated files depend on (lengths are counted in its tokens)."""
    probe = "The pass key is 48213. Anna lives in Paris, and the café's déjà vu."
    return content_hash(getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                        tokenizer(probe, add_special_tokens=False).input_ids)


def documents_hash(documents) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- text helpers

def _tail_with_tokens(text: str, n_tokens: int, tokenizer) -> str:
    """The shortest suffix of `text` starting at a word that has at least `n_tokens` tokens (all of it if shorter)."""
    starts = [m.start() for m in _WORD.finditer(text)]
    lo, hi = 0, len(starts) - 1  # find the largest start index whose suffix is still long enough
    best = 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if _n_tokens(tokenizer, text[starts[mid]:]) >= n_tokens:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return text[starts[best]:] if starts else text


def _head_with_tokens(text: str, n_tokens: int, tokenizer) -> str:
    """The longest prefix of `text` ending at a word end that has at most `n_tokens` tokens."""
    ends = [m.end() for m in _WORD.finditer(text)]
    lo, hi, best = 0, len(ends) - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if _n_tokens(tokenizer, text[:ends[mid]]) <= n_tokens:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return text[:ends[best]] if best >= 0 else ""


# ---------------------------------------------------------------- the three generators

def cloze_examples(documents: list[str], tokenizer, n_examples: int, cloze_context: int, seed: int) -> list[dict]:
    """LAMBADA-style records {context, target}: the target (with its leading space) ends a sentence and occurs
    earlier in the context; contexts have between cloze_context/2 and 3*cloze_context/2 tokens."""
    rng = random.Random(f"{seed}:lb_cloze")
    order = list(range(len(documents)))
    rng.shuffle(order)
    lengths = (max(8, cloze_context // 2), max(8, cloze_context * 3 // 2))
    used: set[tuple[int, int]] = set()
    examples: list[dict] = []
    while len(examples) < n_examples:
        added = 0
        for index in order:  # one example per document per pass, so examples spread over documents
            if len(examples) >= n_examples:
                break
            doc = documents[index]
            candidates = [m for m in _SENTENCE_END_WORD.finditer(doc) if (index, m.start()) not in used
                          and re.search(rf"\b{m.group(1)}\b", doc[:m.start()], flags=re.IGNORECASE)]
            rng.shuffle(candidates)
            for match in candidates:
                used.add((index, match.start()))
                wanted = rng.randint(*lengths)
                prefix = doc[:match.start()].rstrip()
                if len(prefix.split()) < lengths[0] // 2:
                    continue
                available = _n_tokens(tokenizer, prefix)
                if available < lengths[0]:
                    continue
                context = _tail_with_tokens(prefix, min(wanted, available), tokenizer)
                word = match.group(1)
                if not re.search(rf"\b{word}\b", context, flags=re.IGNORECASE):
                    continue  # the earlier occurrence fell outside the trimmed passage
                examples.append({"context": context, "target": " " + word, "doc": index,
                                 "n_tokens": _n_tokens(tokenizer, context)})
                added += 1
                break
        if added == 0:
            break
    return examples


def _filler(documents: list[str], rng: random.Random, n_words: int) -> str:
    """Consecutive held-out documents from a random one on, joined by blank lines, about `n_words` words."""
    start = rng.randrange(len(documents))
    parts, words = [], 0
    for step in range(len(documents)):
        doc = documents[(start + step) % len(documents)]
        parts.append(doc)
        words += len(doc.split())
        if words >= n_words:
            break
    return "\n\n".join(parts)


def passkey_examples(documents: list[str], tokenizer, n_examples: int, passkey_context: int,
                     seed: int) -> list[dict]:
    """Records {context, choices, label, key, depth, n_tokens}: the needle sits at `depth` (0 = start of the
    filler, 1 = end) of a context of about `passkey_context` tokens; choices are 5 keys that differ only in
    their last digit."""
    rng = random.Random(f"{seed}:lb_passkey")
    fixed = _n_tokens(tokenizer, PASSKEY_INTRO + PASSKEY_NEEDLE.format(key="48213") + " " + PASSKEY_QUESTION)
    budget = passkey_context - fixed
    if budget < 16:
        raise UserError(f"eval.passkey_context: {passkey_context} tokens leaves no room for filler; "
                        f"allowed: >= {fixed + 16}")
    examples = []
    for _ in range(n_examples):
        key = rng.randrange(10000, 100000)
        last_digits = [key % 10] + rng.sample([d for d in range(10) if d != key % 10], PASSKEY_CHOICES - 1)
        choices = sorted(str(key - key % 10 + d) for d in last_digits)
        filler = _head_with_tokens(_filler(documents, rng, budget), budget, tokenizer)
        depth = rng.random()
        spans = list(_WORD.finditer(filler))
        if not spans:
            raise UserError("eval: held-out documents are empty; lb_passkey needs filler text")
        at = min(int(depth * len(spans)), len(spans) - 1)
        for shift in range(40):  # the nearest sentence start, so the needle does not split a sentence
            starts = [j for j in (at - shift, at + shift)
                      if 0 < j < len(spans) and filler[spans[j - 1].end() - 1] in ".!?"]
            if starts:
                at = starts[0]
                break
        cut = spans[at].start()
        body = filler[:cut] + PASSKEY_NEEDLE.format(key=key) + " " + filler[cut:]
        context = PASSKEY_INTRO + body.strip() + PASSKEY_QUESTION
        examples.append({"context": context, "choices": choices, "label": choices.index(str(key)),
                         "key": str(key), "depth": round(cut / len(filler), 4),
                         "n_tokens": _n_tokens(tokenizer, context)})
    return examples


def _single_token_words(tokenizer, words) -> list[str]:
    return [w for w in words if _n_tokens(tokenizer, " " + w) == 1]


def mqar_examples(tokenizer, n_examples: int, mqar_pairs: int, seed: int) -> list[dict]:
    """Records {context, choices, label}: `mqar_pairs` person -> city pairs, MQAR_ANSWERED answered queries
    of other people, then the scored query; choices are the cities of the context in order of appearance."""
    if mqar_pairs > len(_NAMES):
        raise UserError(f"eval.mqar_pairs: {mqar_pairs} is too many; allowed: 2..{len(_NAMES)}")
    cities = _single_token_words(tokenizer, _CITIES)
    if len(cities) < mqar_pairs:  # rare tokenizers: multi-token cities still score, just with more passes
        cities = cities + [c for c in _CITIES if c not in cities]
    rng = random.Random(f"{seed}:lb_mqar")
    examples = []
    for number in range(n_examples):
        keys = rng.sample(_NAMES, mqar_pairs)
        values = rng.sample(cities, mqar_pairs)
        asked = number % mqar_pairs  # every position is asked equally often: near and far pairs alike
        others = rng.sample([i for i in range(mqar_pairs) if i != asked], min(MQAR_ANSWERED, mqar_pairs - 1))
        lines = [MQAR_INTRO] + [MQAR_PAIR.format(key=k, value=v) for k, v in zip(keys, values)] + ["\n"]
        lines += [MQAR_QUERY.format(key=keys[i]) + f" {values[i]}.\n\n" for i in others]
        lines.append(MQAR_QUERY.format(key=keys[asked]))
        examples.append({"context": "".join(lines), "choices": list(values), "label": asked, "position": asked})
    return examples


# ---------------------------------------------------------------- files

def _yaml_config(task: str, data_file: Path, info: dict) -> dict:
    common = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
              "test_split": "test", "doc_to_text": "context", "should_decontaminate": False,
              "metadata": {"version": float(FORMAT_VERSION), "generated_by": "layerboost_core.lm_eval_tasks",
                           **info}}
    accuracy = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    if task == "lb_cloze":
        return {**common, "output_type": "loglikelihood", "doc_to_target": "target", "metric_list": accuracy}
    return {**common, "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "label",
            "target_delimiter": " ", "metric_list": accuracy}


def write_offline_tasks(task_dir: Path | None, documents: list[str], tokenizer, settings: dict | None = None) -> Path:
    """Generate lb_cloze, lb_passkey and lb_mqar from held-out `documents`; return the include path for lm-eval.

    The files go to `<task_dir>/lb-<hash>/` (task_dir None: the cache), the hash covering the settings, the
    documents, the tokenizer and the format version; an existing complete folder is reused as is.
    `settings` keys: n_examples, passkey_context, mqar_pairs, cloze_context, seed (DEFAULT_SETTINGS).
    """
    resolved = resolve_settings(settings)
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise UserError("eval: no held-out documents to build the offline lm-eval tasks from")
    info = {"settings": resolved, "documents": documents_hash(documents), "tokenizer": _tokenizer_id(tokenizer)}
    root = Path(task_dir) if task_dir is not None else cache_root() / "lm_eval_tasks"
    folder = (root / f"lb-{content_hash(FORMAT_VERSION, info)}").resolve()
    if (folder / MANIFEST).is_file():
        return folder
    s = resolved
    records = {
        "lb_cloze": cloze_examples(documents, tokenizer, s["n_examples"], s["cloze_context"], s["seed"]),
        "lb_passkey": passkey_examples(documents, tokenizer, s["n_examples"], s["passkey_context"], s["seed"]),
        "lb_mqar": mqar_examples(tokenizer, s["n_examples"], s["mqar_pairs"], s["seed"]),
    }
    for task, rows in records.items():
        if not rows:
            raise UserError(f"eval: the held-out documents are too short to build any {task} example "
                            f"(cloze_context={s['cloze_context']}); use more text or a smaller cloze_context")
        if len(rows) < s["n_examples"]:
            log.warning("%s: %d examples from the held-out documents (asked for %d)", task, len(rows), s["n_examples"])
    import yaml

    for task, rows in records.items():  # data first, configs next, manifest last: it marks the folder complete
        write_text(folder / f"{task}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    for task in records:
        config = _yaml_config(task, folder / f"{task}.jsonl", info)
        write_text(folder / f"{task}.yaml", "# Generated by layerboost_core.lm_eval_tasks; do not edit.\n"
                   + yaml.safe_dump(config, sort_keys=False))
    counts = {task: len(rows) for task, rows in records.items()}
    write_text(folder / MANIFEST, json.dumps({"format": FORMAT_VERSION, **info, "examples": counts}, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------- evaluation

@contextlib.contextmanager
def _quiet():
    """lm-eval and datasets log a lot at INFO/WARNING (e.g. about `limit` and pre-built models); keep errors."""
    names = ("lm_eval", "lm-eval", "datasets", "evaluate")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        bars = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
    except ImportError:
        bars = False
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _offline_when_unreachable(needed: bool):
    """Where the hub cannot be reached, put datasets in offline mode for the call: cached built-in task data
    still loads and uncached data fails at once, instead of after about a minute of retries."""
    from .models import hub_reachable

    if not needed or hub_reachable():
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool):
    """Building the index of lm-eval's built-in tasks takes tens of seconds: once per process and setting."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _unknown_task(name: str, known) -> UserError:
    if name.startswith("lb_"):
        return UserError(f"eval.tasks: unknown offline task {name!r}; {did_you_mean(name, OFFLINE_TASKS)}")
    close = difflib.get_close_matches(name, list(known), n=5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return UserError(f"eval.tasks: unknown lm-eval task {name!r}{hint}; offline tasks: {', '.join(OFFLINE_TASKS)}")


def _data_error(name: str, error: Exception) -> UserError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return UserError(f"eval.tasks: lm-eval task {name!r} cannot load its data ({type(error).__name__}: {first[:200]}); "
                     f"built-in tasks need the network or their data cached; offline tasks: {', '.join(OFFLINE_TASKS)}")


# lm-eval's HFLM holds a batch's full logits (batch x tokens x vocabulary floats) and their log-softmax: with
# Gemma 3's 262k vocabulary, 8 rows of 1,024 tokens are 8.6 GB each, and two workers were killed for memory.
LOGITS_BYTES_PER_BATCH = 1 << 30


def batch_for_vocabulary(batch_size: int, vocabulary: int, tokens: int, bytes_per_value: int = 4) -> int:
    """`batch_size`, lowered so one batch's logits of `tokens` tokens fit LOGITS_BYTES_PER_BATCH (at least 1)."""
    return max(1, min(batch_size, LOGITS_BYTES_PER_BATCH // max(tokens * vocabulary * bytes_per_value, 1)))


def evaluate_tasks(model, tokenizer, tasks: list[str], include_path: Path | None, batch_size: int = 8,
                   limit: int | None = None) -> dict[str, float]:
    """Accuracy per task of `model` as it is in memory (patched or not), scored by lm-eval; nothing is saved.

    `tasks` may mix the offline tasks (from `write_offline_tasks`, found under `include_path`) and lm-eval's
    built-in tasks (need their data: network or the datasets cache). `limit` caps examples per task.
    """
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        return {}
    ours = [t for t in tasks if t in OFFLINE_TASKS]
    builtin = [t for t in tasks if t not in OFFLINE_TASKS]
    for name in builtin:
        if name.startswith("lb_"):
            raise _unknown_task(name, OFFLINE_TASKS)
    if ours and (include_path is None or not (Path(include_path) / MANIFEST).is_file()):
        raise UserError(f"eval.tasks: {', '.join(ours)} need the folder written by write_offline_tasks "
                        f"(include_path={include_path!s} has none)")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet(), _offline_when_unreachable(bool(builtin)):
        manager = _task_manager(str(Path(include_path).resolve()) if include_path else None, bool(builtin))
        for name in builtin:
            if name not in manager.all_tasks:
                raise _unknown_task(name, manager.all_tasks)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                              bootstrap_iters=0, log_samples=False, random_seed=None,
                                              numpy_random_seed=None, torch_random_seed=None)
        except Exception:
            for name in builtin:  # name the built-in task whose data cannot be loaded, if that is the cause
                try:
                    manager.load([name])
                except Exception as error:  # datasets / hub raise many types when offline or uncached
                    raise _data_error(name, error) from None
            raise
    scores = {}
    for name in tasks:
        if name not in results["results"]:  # a tag: lm-eval reports its member tasks, not the tag
            raise UserError(f"eval.tasks: {name!r} is an lm-eval tag, not a task or group; name its tasks instead")
        found = results["results"][name]
        metric = next((key for wanted in ("acc", "acc_norm", "exact_match") for key in found
                       if key.split(",")[0] == wanted and isinstance(found[key], (int, float))), None)
        if metric is None:
            raise UserError(f"eval.tasks: lm-eval task {name!r} reports no accuracy (metrics: "
                            f"{', '.join(k for k in found if k != 'alias') or 'none'})")
        scores[name] = float(found[metric])
    return scores
