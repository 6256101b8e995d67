"""Stand-in models for the BFCL backend tests: they sit behind ``generate`` (formatted prompts in, text out).

The oracle replays BFCL's ground truth, written in the handler's output format (``llama``: python calls,
``xlam``: JSON); java/javascript values are written in Java/JS syntax for their declared types, as a model
would. The wrong-answer model calls a function that does not exist. Prompts are matched to entries by their
first user message; multi-turn prompts give the turn (user messages) and step (assistant messages since).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from soce.benchmarks.bfcl import load_category
from soce.benchmarks.bfcl_gen import Generation

OMIT = object()
HEADER = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?=<\|eot_id\|>|$)", re.DOTALL)
NO_CALL = "I cannot do that with the functions I have."


def messages(prompt: str) -> list[tuple[str, str]]:
    """(role, content) of a Llama-3 formatted prompt (the last, open assistant header included)."""
    return [(m.group(1), m.group(2).strip()) for m in HEADER.finditer(prompt)]


def pick(choices: list, required: bool = False) -> Any:
    """A value the checker accepts: OMIT when "" (left out) is acceptable and the parameter is not required
    (some ground truths list "" for required ones), else the first other acceptable value."""
    given = [c for c in choices if c != ""]
    return OMIT if not given or ("" in choices and not required) else resolve(given[0])


def resolve_call(call: dict, entry: dict) -> dict:
    """One ground-truth call ``{name: {param: [acceptable values]}}`` -> ``{name: {param: value}}``."""
    required = {f["name"]: set(f["parameters"].get("required", [])) for f in entry["function"]}
    out = {}
    for name, params in call.items():
        picked = {k: pick(v, k in required.get(name, ())) for k, v in params.items()}
        out[name] = {k: v for k, v in picked.items() if v is not OMIT}
    return out


def resolve(value: Any) -> Any:
    if isinstance(value, dict):  # nested dicts hold acceptable-value lists per key
        picked = {k: pick(v) if isinstance(v, list) else resolve(v) for k, v in value.items()}
        return {k: v for k, v in picked.items() if v is not OMIT}
    if isinstance(value, list):
        return [resolve(v) for v in value]
    return value


def java(value: Any, typ: str, items: str | None = None, quote: bool = True) -> str:
    """``value`` as Java source for declared type ``typ`` (``quote``: string literals in quotes)."""
    if typ in ("String", "any", "char"):
        return json.dumps(str(value)) if quote else str(value)
    if typ == "boolean":
        return "true" if value else "false"
    if typ == "long":
        return f"{value}L"
    if typ == "float":
        return f"{value}f"
    if typ in ("Array", "ArrayList") and isinstance(value, str):
        return value  # a variable holding the collection
    if typ in ("Array", "ArrayList"):  # bfcl-eval's collection parsers keep quotes: names are written bare
        elems = ", ".join(
            v
            if isinstance(v, str) and re.fullmatch(r"\w+", v)
            else java(v, "boolean" if isinstance(v, bool) else items or "String")
            for v in value
        )
        if typ == "ArrayList":
            return f"new ArrayList<>(Arrays.asList({elems}))"
        return f"new {({'integer': 'int'}).get(items or 'String', items or 'String')}[]{{{elems}}}"
    if typ == "HashMap" and isinstance(value, dict):  # bfcl-eval's Java parser drops {{...}} bodies: only a
        # string keeps one (xlam's JSON)
        puts = " ".join(f"put({json.dumps(k)}, {json.dumps(v)});" for k, v in value.items())
        text = f"new HashMap<String, String>() {{{{ {puts} }}}}"
        return json.dumps(text) if quote else text
    return str(value)


def js(value: Any, typ: str, quote: bool = True) -> str:
    """``value`` as JavaScript source for declared type ``typ``."""
    if typ == "Boolean":
        return "true" if value else "false"
    if typ in ("array", "dict"):
        return json.dumps(value)
    if typ == "String":
        return json.dumps(str(value)) if quote else str(value)
    return str(value)


def source_args(args: dict, props: dict, category: str, quote: bool) -> dict[str, str]:
    """Java/JS arguments as source text per parameter (bfcl-eval checks them as strings of that language)."""
    types = {k: props.get(k, {"type": "any"}) for k in args}
    if category == "java":
        return {k: java(v, types[k]["type"], types[k].get("items", {}).get("type"), quote) for k, v in args.items()}
    return {k: js(v, types[k]["type"], quote) for k, v in args.items()}


def call_text(calls: list[dict], entry: dict, fmt: str) -> str:
    """Ground-truth calls ``[{name: {param: value}}]`` as the model would write them."""
    category = entry["id"].rsplit("_", 1)[0]
    docs = {f["name"]: f["parameters"]["properties"] for f in entry["function"]}
    out = []
    for call in calls:
        for name, args in call.items():
            if category in ("java", "javascript"):
                args = source_args(args, docs.get(name, {}), category, quote=fmt != "xlam")
                parts = [f"{k}={v}" for k, v in args.items()]
            else:
                parts = [f"{k}={v!r}" for k, v in args.items()]
            out.append({"name": name, "arguments": args} if fmt == "xlam" else f"{name}({', '.join(parts)})")
    return json.dumps(out) if fmt == "xlam" else "[" + ", ".join(out) + "]"


def parse_call(text: str, entry: dict) -> dict:
    """``f('x', b=1)`` (BFCL's multi-turn ground truth) -> ``{"f": {"a": "x", "b": 1}}`` (positional arguments
    named from the function doc's parameter order: bfcl-eval's decoder keeps keyword arguments only)."""
    node = ast.parse(text, mode="eval").body
    docs = [*entry["function"], *(f for fs in entry.get("missed_function", {}).values() for f in fs)]
    names = next(list(f["parameters"]["properties"]) for f in docs if f["name"] == node.func.id)
    args = {names[i]: ast.literal_eval(a) for i, a in enumerate(node.args)}
    return {node.func.id: {**args, **{k.arg: ast.literal_eval(k.value) for k in node.keywords}}}


def first_user(entry: dict) -> str:
    return next(m["content"] for m in entry["question"][0] if m["role"] == "user").strip()


class Oracle:
    """Replays the ground truth of the given entries (``right=False``: a wrong call, always)."""

    def __init__(self, ids: dict[str, list[str]], fmt: str = "llama", right: bool = True) -> None:
        self.fmt, self.right, self.by_question, self.prompts = fmt, right, {}, 0
        for category, wanted in ids.items():
            entries, answers = load_category(category)
            for i, e in enumerate(entries):
                if e["id"] in wanted:
                    key = first_user(e)
                    assert key not in self.by_question, f"two sampled entries share a first question: {e['id']}"
                    self.by_question[key] = (e, answers[i]["ground_truth"] if answers else None)

    def __call__(self, prompts: list[str]) -> list[Generation]:
        self.prompts += len(prompts)
        return [Generation(self.answer(p), len(p), 1) for p in prompts]

    def answer(self, prompt: str) -> str:
        if not self.right:
            return call_text([{"no_such_function": {"x": 1}}], {"id": "wrong_0", "function": []}, self.fmt)
        msgs = messages(prompt)
        users = [i for i, (role, _) in enumerate(msgs) if role == "user"]
        return self.reply(msgs, users, *self.by_question[msgs[users[0]][1]])

    def reply(self, msgs: list, users: list[int], entry: dict, truth: Any) -> str:
        """The ground truth's next message for the conversation ``msgs`` (``users``: its user turns) of ``entry``."""
        category = entry["id"].rsplit("_", 1)[0]
        if "irrelevance" in category:
            return NO_CALL
        if category == "live_relevance":
            return call_text([{entry["function"][0]["name"]: {}}], entry, self.fmt)
        if not category.startswith("multi_turn"):
            return call_text([resolve_call(c, entry) for c in truth], entry, self.fmt)
        turn, step = len(users) - 1, len(msgs) - 2 - users[-1]  # assistant/tool messages since the last user
        if step > 0 or not truth[turn]:
            return NO_CALL  # decodes to nothing: bfcl-eval moves on to the next turn
        return call_text([parse_call(c, entry) for c in truth[turn]], entry, self.fmt)


def direct_verdict(entry: dict, answer: dict, fmt: str) -> bool:
    """bfcl-eval's own verdict on the oracle's text for a java/javascript entry, called directly (decoder and
    AST checker, no soce code): some ground truths cannot be written in a form its Java/JS parsers read back
    (string elements of arrays keep their quotes, HashMap bodies are dropped)."""
    from soce.benchmarks import bfcl_sdk

    bfcl = bfcl_sdk.load()
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    kind = bfcl.llama.LlamaHandler if fmt == "llama" else bfcl.salesforce_llama.SalesforceLlamaHandler
    category = entry["id"].rsplit("_", 1)[0]
    language = "JavaScript" if category == "javascript" else "Java"
    text = call_text([resolve_call(c, entry) for c in answer["ground_truth"]], entry, fmt)
    try:
        decoded = kind("oracle", 0.0).decode_ast(text, language)
        return bool(
            ast_checker(
                entry["function"],
                decoded,
                answer["ground_truth"],
                language,
                category,
                "meta-llama_Llama-3.1-8B-Instruct",
            )["valid"]
        )
    except Exception:  # noqa: BLE001 - a decoder error is bfcl-eval's "invalid"
        return False


class Silent(Oracle):
    """Never calls a function (multi-turn: leaves the APIs' state as it started)."""

    def answer(self, prompt: str) -> str:
        return NO_CALL


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def tiny_llama(chat_template: bool = False):
    """A random 2-layer Llama (hidden 64, fp32, seeded) and a byte-level BPE tokenizer trained on BFCL prompts,
    with the Llama-3 special tokens the handlers write (and a Llama-3 chat template if ``chat_template``)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.dumps(e) for c, n in (("simple", 20), ("multi_turn_base", 4)) for e in load_category(c)[0][:n]]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=special, show_progress=False, initial_alphabet=alphabet
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=LLAMA3_TEMPLATE if chat_template else None,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    )
    return LlamaForCausalLM(config).eval(), tokenizer
