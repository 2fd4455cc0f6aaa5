"""Render results/summary.md from the results/*.json files the interop suite writes (lab.write_results)."""
from __future__ import annotations

import json
from pathlib import Path

TYPES = ("f32", "f16", "bf16", "q8_0")


def _load(results: Path, section: str) -> tuple[dict, dict]:
    p = results / f"{section}.json"
    if not p.exists():
        return {}, {}
    d = json.loads(p.read_text())
    return d.get("entries", {}), d.get("versions", {})


def _e(x: float) -> str:
    return f"{x:.1e}"


_PRESET_ORDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
                 "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_XS", "IQ4_NL", "TQ1_0", "TQ2_0", "MXFP4_MOE")


def render(results: Path) -> str:
    out = ["# sling interop results", "",
           "Written by the interop suite (`scripts/test`, tests/interop); figures from its last run."
           " Entries of tests that did not run in that session are kept from earlier runs.", ""]
    versions = {}

    conv, v = _load(results, "convert_bytes")
    versions.update(v)
    if conv:
        names = sorted({k.split("/")[0] for k in conv})
        out += ["## Byte identity with llama.cpp's convert_hf_to_gguf.py", "",
                "Tensors identical (name, type, shape, bytes) / total, per fixture and `--type`; tensor order and every"
                " metadata key equal too, except the `general.*` naming keys and the intended"
                " `deepseek2.expert_gating_func = 2` of deepseekv3/deepseekv3-fp8 (marked *).", "",
                "| fixture | " + " | ".join(TYPES) + " |", "|---|" + "---|" * len(TYPES)]
        all_ok, n_ok = True, 0
        for n in names:
            cells = []
            for t in TYPES:
                e = conv.get(f"{n}/{t}")
                if e is None:
                    cells.append("-")
                    continue
                ok = (not e["kv_diffs"] and not e["tensor_diffs"] and e["tensor_order_equal"]
                      and e["tensors_identical"] == e["tensors_total"])
                all_ok &= ok
                n_ok += ok
                cells.append(f"{e['tensors_identical']}/{e['tensors_total']}" + ("*" if "intended" in e else "")
                             + ("" if ok else " **DIFF**"))
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out += ["", f"{n_ok} of {len(conv)} conversions identical." if all_ok
                else f"{n_ok} of {len(conv)} conversions identical; see results/convert_bytes.json.", ""]

    logits, v = _load(results, "logits")
    versions.update(v)
    if logits:
        n_tok = next(iter(logits.values())).get("n_tokens")
        out += ["## Logits: llama.cpp on sling's GGUF vs transformers float32", "",
                f"{n_tok} tokens; llama.cpp KV cache F32, flash-attention off. KL(transformers || llama.cpp) in nats"
                " (mean / max over positions), top-1 agreement.", "",
                "| fixture | F32 KL mean | F32 KL max | F32 top-1 | F16 KL mean | F16 KL max | F16 top-1 |",
                "|---|---|---|---|---|---|---|"]
        notes = []
        for n, e in sorted(logits.items()):
            f32, f16 = e.get("f32"), e.get("f16")
            if not f32 or not f16:
                continue
            out.append(f"| {n} | {_e(f32['kl_mean'])} | {_e(f32['kl_max'])} | {f32['top1']:.3f} | "
                       f"{_e(f16['kl_mean'])} | {_e(f16['kl_max'])} | {f16['top1']:.3f} |")
            if e.get("reference") != "transformers float32":
                notes.append(f"- {n}: reference is {e['reference']}.")
            r = e.get("reference_f32_softmax_routing")
            if r:
                notes.append(f"- {n}: the reference converter's F32 file (no `deepseek2.expert_gating_func`, so"
                             f" llama.cpp routes with softmax) gives KL mean {_e(r['kl_mean'])}, max"
                             f" {_e(r['kl_max'])}, top-1 {r['top1']:.3f}.")
        lim = sorted({(json.dumps(e.get("kl_mean_limits")), n) for n, e in logits.items()})
        groups: dict[str, list] = {}
        for l, n in lim:
            groups.setdefault(l, []).append(n)
        if groups:
            notes.append("- Limits on KL mean: " + "; ".join(
                f"{', '.join(ns) if len(groups) > 1 and len(ns) < 4 else 'the others' if len(groups) > 1 else 'all'}:"
                f" {', '.join(f'{t.upper()} {v:g}' for t, v in json.loads(l).items())}"
                for l, ns in sorted(groups.items(), key=lambda g: len(g[1]))
                if l != "null") + " (gptoss-mxfp4: llama.cpp quantizes activations to Q8 in MXFP4 matmuls).")
        out += [""] + notes + ([""] if notes else [])

    fwd, v = _load(results, "forward")
    versions.update(v)
    if fwd:
        out += ["## Calibration forward pass (`sling logits`) vs transformers float32", "",
                "sling's own CPU forward pass (crate calibration/, f32, layer by layer; FP8 and MXFP4 dequantized"
                " exactly) against transformers float32. KL(transformers || sling) in nats (mean / max over"
                " positions), max |logit difference|, top-1 agreement. `/batch`: a 16-token and a 200-token"
                " sequence in one batch, each against transformers on that sequence alone.", "",
                "| fixture | tokens | KL mean | KL max | max abs | top-1 |", "|---|---|---|---|---|---|"]
        for n, e in sorted(fwd.items()):
            parts = [("", e)] if "kl_mean" in e else [(f" ({k})", e[k]) for k in ("short", "long") if k in e]
            for suffix, s in parts:
                nt = e["n_tokens"] if isinstance(e["n_tokens"], int) else e["n_tokens"].get(suffix.strip(" ()"), "")
                out.append(f"| {n}{suffix} | {nt} | {_e(s['kl_mean'])} | {_e(s['kl_max'])} | {_e(s['maxabs'])} |"
                           f" {s['top1']:.3f} |")
        lims = sorted({e.get("kl_mean_limit") for e in fwd.values() if e.get("kl_mean_limit") is not None})
        if lims:
            out += ["", "Limit on KL mean: " + ", ".join(f"{x:g}" for x in lims) + "; top-1 must be 1."]
        out.append("")

    ev, v = _load(results, "eval")
    versions.update(v)
    if ev:
        out += ["## Evaluation (`sling eval`) vs llama-perplexity", "",
                "The candidate is `sling quantize`'s file; both tools on the same text (tests/interop/data/eval.txt),"
                " 64-token chunks; KLD base logits from the reference converter's F32 file. Limits: PPL within 1 %,"
                " mean KLD within 5 % relative (docs/eval.md explains the gap: llama.cpp rounds activations to 8 bits).",
                "", "| fixture | preset | PPL sling | PPL llama.cpp | gap | KLD sling | KLD llama.cpp | gap |"
                " top-1 sling / llama.cpp |", "|---|---|---|---|---|---|---|---|---|"]
        for k, e in sorted(ev.items()):
            s_, l_ = e["sling"], e["llama_perplexity"]
            n, p = k.split("/", 1)
            out.append(f"| {n} | {p} | {s_['ppl']:.2f} | {l_['ppl']:.2f} | {100 * e['ppl_rel']:.2f} % |"
                       f" {s_['kld_mean']:.5f} | {l_['kld_mean']:.5f} | {100 * e['kld_rel']:.2f} % |"
                       f" {100 * s_['top1']:.1f} % / {100 * l_['top1']:.1f} % |")
        out.append("")

    split, v = _load(results, "split")
    versions.update(v)
    if split:
        out += ["## Split output", "", "| model | option | shards | shards = reference | merged = unsplit |"
                " split-model logits = unsplit |", "|---|---|---|---|---|---|"]
        for k, e in sorted(split.items()):
            out.append(f"| {'/'.join(k.split('/')[:2])} | `{' '.join(e['args'])}` | {e['shards']} | "
                       f"{'yes' if e['shards_identical_to_reference'] else 'no'} | "
                       f"{e['merged_tensors_identical']}/{e['tensors']} tensors | "
                       f"{'bit-identical' if e['logits_split_equal_unsplit'] else 'DIFFERENT'} |")
        out.append("")

    qb, v = _load(results, "quantize_bytes")
    versions.update(v)
    if qb:
        plain = {k: e for k, e in qb.items() if k.count("/") == 1}
        other = {k: e for k, e in qb.items() if k.count("/") == 2}
        presets = sorted({k.split("/")[1] for k in plain}, key=lambda p: list(_PRESET_ORDER).index(p)
                         if p in _PRESET_ORDER else 99)
        models = sorted({k.split("/")[0] for k in plain})
        n_ok = sum(e["tensors_identical"] == e["tensors_total"] and not e["kv_diffs"] for e in qb.values())
        out += ["## Quantization: byte identity with convert_hf_to_gguf.py --outtype bf16 + llama-quantize", "",
                f"{n_ok} of {len(qb)} cases identical (every tensor's name, type, shape and bytes, tensor order, every "
                "metadata key but the naming keys). Tensors identical / total per fixture and preset; `-wide` fixtures "
                "have every dimension a multiple of 256 (K-quants on their main path), the others take llama-quantize's "
                "row fallbacks.", "",
                "| fixture | " + " | ".join(presets) + " |", "|---|" + "---|" * len(presets)]
        for m in models:
            cells = []
            for p in presets:
                e = plain.get(f"{m}/{p}")
                cells.append("" if e is None else f"{e['tensors_identical']}/{e['tensors_total']}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        if other:
            out += ["", "With an imatrix (llama-imatrix output, GGUF and legacy .dat) and with llama-quantize flags given "
                    "to both tools:", "", "| variant | cases identical | fixtures | presets |", "|---|---|---|---|"]
            groups: dict[str, list] = {}
            for k, e in other.items():
                m, p, var = k.split("/")
                groups.setdefault(var, []).append((m, p, e))
            for var, es in sorted(groups.items()):
                ok = sum(e["tensors_identical"] == e["tensors_total"] and not e["kv_diffs"] for _, _, e in es)
                out.append(f"| {var} | {ok}/{len(es)} | {', '.join(sorted({m for m, _, _ in es}))} | "
                           f"{', '.join(sorted({p for _, p, _ in es}))} |")
        out.append("")
    qg, v = _load(results, "quantize_gguf_source")
    if qg:
        n_ok = sum(e["file_identical"] for e in qg.values())
        out += ["## Quantization from a GGUF source", "",
                f"`sling quantize model.gguf` vs `llama-quantize model.gguf`: {n_ok} of {len(qg)} output files identical "
                "(whole file, byte for byte): " + ", ".join(sorted(qg)) + ".", ""]
    ql, v = _load(results, "quantize_logits")
    if ql:
        presets = [p for p in _PRESET_ORDER if any(k.endswith("/" + p) for k in ql)]
        models = sorted({k.split("/")[0] for k in ql})
        out += ["## Quantized logits (llama.cpp on sling's quantized files vs its F32 file)", "",
                "KL mean (nats) / top-1 agreement over 16 tokens. The fixtures are random-init tiny models, much harder "
                "to quantize than trained ones: the figures show that llama.cpp loads and runs every output and that "
                "quality orders as expected, not what a real model loses.", "",
                "| fixture | " + " | ".join(presets) + " |", "|---|" + "---|" * len(presets)]
        for m in models:
            out.append(f"| {m} | " + " | ".join(
                (f"{ql[f'{m}/{p}']['kl_mean']:.3f} / {ql[f'{m}/{p}']['top1']:.2f}" if f"{m}/{p}" in ql else "")
                for p in presets) + " |")
        out.append("")

    if versions:
        out += ["## Tools", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(out)


if __name__ == "__main__":
    import sys
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"))
