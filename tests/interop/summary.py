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
_IQ_ORDER = ("IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


_VLLM_SCHEMES = ("w4a16", "w4a16-asym", "w8a16", "fp8-dynamic", "fp8-block", "nvfp4", "mxfp4")


def _identical_cell(e: dict | None, count: str, unit: str) -> str:
    """'' for no entry, "yes (N unit)" when the entry says identical, else a bold NO."""
    return "" if not e else (f"yes ({e[count]}{unit})" if e.get("identical") else "**NO**")


def _split_key(entries: dict, n_head: int) -> dict[tuple, dict]:
    """{"a/b/kind": e} -> {("a", "b"): {"kind": e}} for keys with n_head leading parts."""
    out: dict[tuple, dict] = {}
    for k, e in entries.items():
        parts = k.split("/")
        if len(parts) == n_head + 1:
            out.setdefault(tuple(parts[:n_head]), {})[parts[-1]] = e
    return out


def _num(s: str) -> int:
    """The number in a key part such as "q4", "g32" or "2048" (99 if none), for sorting."""
    d = "".join(ch for ch in s if ch.isdigit())
    return int(d) if d else 99


def _kl_cell(e: dict | None) -> str:
    return "" if not e or "kl_mean" not in e else f"{_e(e['kl_mean'])} / {_e(e['maxabs'])}"


def _vllm(entries: dict) -> list[str]:
    cases = _split_key(entries, 2)
    if not cases:
        return []
    order = sorted(cases, key=lambda c: (c[0], _VLLM_SCHEMES.index(c[1]) if c[1] in _VLLM_SCHEMES else 99, c[1]))
    out = ["## compressed-tensors (vLLM) directories", "",
           "`sling quantize --to vllm:SCHEME` against compressed-tensors' and transformers' own code."
           " CT decompress: modules whose CT compressor output equals `sling dequantize` bit for bit in float32 /"
           " quantized modules. Codes ≠: CT's `quantize` of the float32 source weight with sling's stored scale"
           " (must be 0); the BF16-division count (CT's CPU path on a BF16 weight, x/scale rounded to BF16) is"
           " recorded, not asserted (n/a: source not BF16). Scales / zero points / NVFP4 global scale ≠: vs CT's"
           " calculate_qparams / generate_gparam on the float32 weight (- where the scheme has none)."
           " convert_hf_to_gguf.py `--outtype f32` on the directory vs on a plain directory of `sling dequantize`'s"
           " tensors: tensors identical / total (nvfp4: max relative difference of llama.cpp's NVFP4 decode)."
           " transformers (CPU, float32): KL(transformers || `sling logits`) mean / max abs logit difference.", "",
           "| fixture | scheme | CT decompress | codes ≠ (f32) | codes ≠ (BF16 division) | scales / zp / global ≠ |"
           " convert_hf_to_gguf | transformers dequantize=True | transformers default |",
           "|---|---|---|---|---|---|---|---|---|"]
    n_ok = n_ct = 0
    for c in order:
        kinds = cases[c]
        name, scheme = c
        ct, rtn, gg = kinds.get("ct_decompress"), kinds.get("rtn"), kinds.get("convert_hf_to_gguf")
        ct_cell = ""
        if ct:
            ok = ct["bit_identical_f32"] == ct["quantized_modules"]
            n_ct += 1
            n_ok += ok
            ct_cell = f"{ct['bit_identical_f32']}/{ct['quantized_modules']}" + ("" if ok else " **DIFF**")
        f32 = bf16 = qp = ""
        if rtn:
            f32 = str(rtn["codes_f32_mismatch"]) + ("" if rtn["codes_f32_mismatch"] == 0 else " **DIFF**")
            b = rtn.get("codes_bf16_division_mismatch")
            bf16 = ("n/a" if b is None else f"{b} ({100 * b / rtn['elements']:.2f} %)" if b and rtn["elements"]
                    else str(b))
            qp = " / ".join(str(v) if v or applies else "-" for v, applies in (
                (rtn["scale_mismatch"], True), (rtn["zero_point_mismatch"], "asym" in scheme),
                (rtn["global_scale_mismatch"], scheme == "nvfp4")))
        gg_cell = ""
        if gg and "max_rel_diff" in gg:
            gg_cell = f"max rel {_e(gg['max_rel_diff'])} ({gg['nvfp4_tensors']} NVFP4 of {gg['tensors_total']})"
        elif gg:
            gg_cell = f"{gg['tensors_identical']}/{gg['tensors_total']}" + (
                "" if gg["tensors_identical"] == gg["tensors_total"] and not gg.get("kv_diffs") else " **DIFF**")
        out.append(f"| {name} | {scheme} | {ct_cell} | {f32} | {bf16} | {qp} | {gg_cell} |"
                   f" {_kl_cell(kinds.get('transformers'))} | {_kl_cell(kinds.get('transformers-default'))} |")
    notes = []
    if n_ct:
        notes.append(f"- {n_ok} of {n_ct} cases: every quantized module decompressed bit-identical by CT.")
    tf = {f"{n}/{s}": cases[(n, s)]["transformers"] for n, s in order if "transformers" in cases[(n, s)]}
    if tf:
        worst = max(e["same_weights"]["kl_mean"] for e in tf.values() if "same_weights" in e) \
            if any("same_weights" in e for e in tf.values()) else None
        lims: dict[float, list] = {}
        for k, e in tf.items():
            lims.setdefault(e.get("kl_limit"), []).append(k)
        lim_txt = "; ".join(f"{l:.0e} for {', '.join(ks) if len(ks) < len(tf) / 2 or len(lims) == 1 else 'the others'}"
                            for l, ks in sorted(lims.items(), key=lambda g: len(g[1])) if l is not None)
        notes.append("- transformers dequantize=True: KL mean limit " + lim_txt
                     + " (the larger one where transformers rounds parameters to BF16)."
                     + (f" Against `sling logits` of the very weights transformers holds: KL mean ≤ {_e(worst)}."
                        if worst is not None else ""))
    if any("transformers-default" in k for k in cases.values()):
        notes.append("- transformers default mode (dequantize=False): fp8-dynamic fake-quantizes activations to FP8"
                     " there, so its KL is recorded only; the others' KL mean must be < 1e-3.")
    return out + [""] + notes + ([""] if notes else [])


def _mlx(entries: dict) -> list[str]:
    cases = _split_key(entries, 3)
    if not cases:
        return []
    order = sorted(cases, key=lambda c: (c[0], _num(c[1]), _num(c[2])))
    out = ["## MLX directories", "",
           "`sling quantize --to mlx:BITS` against mlx / mlx-lm (Linux CPU). Logits: KL(mlx-lm || `sling logits`)"
           " on the same directory, mean / max abs logit difference, after `model.set_dtype(float32)` (limit KL mean"
           " 1e-9, top-1 1) and in mlx-lm's native BF16 compute (recorded only). mx.quantize: every quantized"
           " module's packed words, scales and biases equal `mx.quantize(mode=\"affine\")` of the source weights"
           " (float32 upcast and BF16 alike; number of modules). Router overrides: per-module entries in"
           " config.json's `quantization` (Qwen3-MoE's routers at 8 bits, group 64, as its quant_predicate).", "",
           "| fixture | bits | group | float32 KL mean / max abs | native BF16 KL mean / max abs | BF16 top-1 |"
           " mx.quantize identical | router overrides |", "|---|---|---|---|---|---|---|---|"]
    for c in order:
        kinds = cases[c]
        lg, mq, cfg = kinds.get("logits") or {}, kinds.get("mx_quantize"), kinds.get("config")
        nat = lg.get("mlx_native_bf16")
        mq_cell = _identical_cell(mq, "quantized_modules", " modules")
        out.append(f"| {c[0]} | {c[1].lstrip('q')} | {c[2].lstrip('g')} | {_kl_cell(lg.get('float32'))} |"
                   f" {_kl_cell(nat)} | {'' if not nat else format(nat['top1'], '.3f')} | {mq_cell} |"
                   f" {'' if not cfg else cfg['router_overrides']} |")
    return out + [""]


def _mlx_convert(entries: dict) -> list[str]:
    base = {tuple(k.split("/")): e for k, e in entries.items() if k.count("/") == 2}
    extra = _split_key(entries, 3)
    cases = sorted(set(base) | set(extra), key=lambda c: (c[0], _num(c[1]), _num(c[2])))
    if not cases:
        return []
    out = ["## MLX directories against `mlx_lm.convert` (test_mlx_convert.py)", "",
           "sling's `--to mlx:BITS` directory and `mlx_lm.convert -q` of the same fixture: tensors byte-identical"
           " (names, dtypes, shapes, bytes), `config.json` and `model.safetensors.index.json` byte-identical."
           " Logits: KL(mlx-lm float32 || `sling logits`) mean / max abs on sling's directory (limit 1e-9, top-1"
           " 1; bf16 gpt-oss: sling's directory only, mlx-lm cannot convert it). Rearranged: DeepSeek-V3's"
           " kv_b_proj and gpt-oss's experts read back by `sling dequantize` equal mx.dequantize of mlx-lm's"
           " tensors (number of tensors).", "",
           "| fixture | bits | group | tensors identical | config + index identical | modes | float32 KL mean / max abs |"
           " rearranged identical |", "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        b, k = base.get(c) or {}, extra.get(c) or {}
        ident = f"{b['identical_tensors']}/{b['tensors']}" if b else ""
        cfg = "" if not b else ("yes" if b.get("config_identical") and b.get("index_identical") else "**NO**")
        rr_cell = _identical_cell(k.get("rearranged"), "tensors", "")
        out.append(f"| {c[0]} | {c[1].lstrip('q')} | {c[2].lstrip('g')} | {ident} | {cfg} |"
                   f" {', '.join(b.get('modes', []))} | {_kl_cell((k.get('logits') or {}).get('float32'))} |"
                   f" {rr_cell} |")
    calibrated = sorted((k, e) for k, e in entries.items() if k.count("/") == 3 and k.split("/")[3] in ("gptq", "awq"))
    if calibrated:
        out += ["", "`--method gptq|awq` on these layouts (mlx:4, group 32, calib.txt): weights solved, weights"
                " rounded to nearest where no solver takes mlx-lm's layout (listed in the manifest), MXFP4 expert"
                " codes kept; mlx-lm float32 logits vs `sling logits`.", "",
                "| fixture | method | weights solved | weights rounded to nearest | tensors = the RTN run's | float32 KL mean / max abs |",
                "|---|---|---|---|---|---|"]
        for k, e in calibrated:
            f, _, _, m = k.split("/")
            out.append(f"| {f} | {m} | {e['solved_weights']} | {e['rounded_to_nearest']} | {e['kept_codes']} |"
                       f" {_kl_cell(e.get('float32'))} |")
    return out + [""]


def _gptq(entries: dict) -> list[str]:
    if not entries:
        return []
    out = ["## GPTQ (`--method gptq`, tests/interop/test_gptq.py)", "",
           "One layer of the trained fixture vs llm-compressor 0.14.0.1's own GPTQ code (`gptq_ref.py`): codes and"
           " scales with the same fixed Hessian; reconstruction error ||(W - W^)X||^2 with each tool's own Hessian.", "",
           "| case | codes identical (fixed H) | scales identical | error sling / llm-compressor | GPTQ / RTN error |",
           "|---|---|---|---|---|"]
    for k in sorted(k for k in entries if k.startswith("layer/") and k.count("/") == 1):
        e = entries[k]
        fh, fi = e["fixed_hessian"], e["from_inputs"]
        out.append(f"| {k.split('/', 1)[1]} | {fh['codes_identical']:.6f} | {'yes' if fh['scales_identical'] else '**NO**'}"
                   f" | {fi['sling_over_ref']:.4f} | {fi['sling_over_rtn']:.3f} |")
    out += ["", "End to end on the trained Qwen3-MoE (`sling eval` on eval.txt):", "",
            "| target | calibration tokens | KLD RTN | KLD GPTQ | ratio | top-1 RTN / GPTQ |", "|---|---|---|---|---|---|"]
    for k in sorted(k for k in entries if k.startswith("e2e/")):
        e = entries[k]
        out.append(f"| {k.split('/')[-1]} | {e['calibration_tokens']} | {e['kld_rtn']:.5f} | {e['kld_gptq']:.5f} |"
                   f" {e['kld_ratio']:.3f} | {e['top1_rtn']:.3f} / {e['top1_gptq']:.3f} |")
    for k in sorted(k for k in entries if k.startswith("load/") or k.startswith("dead-expert/")):
        out.append(f"- {k}: {json.dumps(entries[k])}")
    return out + [""]


def _awq(entries: dict) -> list[str]:
    if not entries:
        return []
    out = ["## AWQ (`--method awq`, tests/interop/test_awq.py)", "",
           "End to end on the trained Qwen3-MoE (`sling eval` on eval.txt):", "",
           "| target | calibration tokens | KLD RTN | KLD AWQ | ratio | top-1 RTN / AWQ |", "|---|---|---|---|---|---|"]
    for k in sorted(k for k in entries if k.startswith("e2e/")):
        e = entries[k]
        out.append(f"| {k.split('/')[-1]} | {e['calibration_tokens']} | {e['kld_rtn']:.5f} | {e['kld_awq']:.5f} |"
                   f" {e['kld_ratio']:.3f} | {e['top1_rtn']:.3f} / {e['top1_awq']:.3f} |")
    for k in sorted(k for k in entries if k.startswith("vs-llm-compressor/")):
        e = entries[k]
        out += ["", f"Against llm-compressor 0.14's AWQ on the same token ids ({k.split('/')[-1]}): KLD llm-compressor "
                f"{e['kld_llmc_awq']:.5f}, sling {e['kld_sling_awq_default']:.5f} (routed statistics), "
                f"{e['kld_sling_awq_all_experts']:.5f} (`--all-experts`), sling RTN {e['kld_sling_rtn']:.5f}."]
    for k in sorted(k for k in entries if k.startswith("awq-gptq/") and k.count("/") == 2):
        e = entries[k]
        out += ["", f"AWQ then GPTQ (`--method awq-gptq --act-order --all-experts`, {k.split('/')[-1]}) against"
                f" llm-compressor 0.14's `[AWQModifier, GPTQModifier]` on the same token ids: KLD llm-compressor"
                f" {e['kld_llmc_awq_gptq']:.5f}, sling {e['kld_sling_awq_gptq']:.5f} ({e['sling_over_llmc']:.3f}x);"
                f" sling AWQ alone {e['kld_sling_awq']:.5f}, RTN {e['kld_sling_rtn']:.5f}."]
    out.append("")
    for k in sorted(k for k in entries if k.startswith("load/") or k.startswith("awq-gptq/load/")):
        out.append(f"- {k}: {json.dumps(entries[k])}")
    return out + [""]


def _st_write(entries: dict) -> list[str]:
    if not entries:
        return []
    out = ["## safetensors writer", "",
           "`st_write_demo` (sling_formats::st_write) output vs the Python writers, whole files byte for byte:"
           " a single file vs `safetensors.torch.save_file` / `safetensors.numpy.save_file`, and shard sets vs"
           " huggingface_hub's `split_torch_state_dict_into_shards` + `save_file` per shard + transformers 5's"
           " index JSON.", "", "| case | reference | written | byte-identical |", "|---|---|---|---|"]
    for k, e in sorted(entries.items(), key=lambda kv: (kv[0].startswith("sharded/"), -_num(kv[0]), kv[0])):
        if k.startswith("sharded/"):
            ref, what = "hub split + save_file + index", f"{e.get('files')} files (max shard {k.split('/', 1)[1]} B)"
        else:
            ref = "safetensors." + k.replace("_save_file", ".save_file")
            what = f"1 file, {e.get('tensors')} tensors" + (f", {e['bytes']} B" if "bytes" in e else "")
        out.append(f"| {k} | {ref} | {what} | {'yes' if e.get('identical') else '**NO**'} |")
    return out + [""]


def _nonfinite(entries: dict) -> list[str]:
    if not entries:
        return []
    out = ["## Non-finite weights (Q8_0, `--allow-nonfinite`)", "",
           "`test_nonfinite.py`: NaN, -NaN and ±Inf in a copy of qwen3moe. convert vs `convert_hf_to_gguf.py --outtype"
           " q8_0` (gguf-py) on the whole file; quantize vs llama-quantize, which refuses non-finite input, so: its"
           " file of the clean fixture in every other tensor, and `ggml_quantize_chunk`'s bytes in the poisoned"
           " ones.", ""]
    for k, e in sorted(entries.items()):
        if "file_identical" in e:
            out.append(f"- {k}: whole file {'identical' if e['file_identical'] else '**DIFFERENT**'}"
                       f" ({e['tensors_identical']}/{e['tensors_total']} tensors)")
        else:
            out.append(f"- {k}: {e['clean_tensors_identical']}/{e['tensors_total']} tensors identical to the clean"
                       f" reference, {e['poisoned_equal_to_ggml_quantize_chunk']}/{e['poisoned']} poisoned tensors"
                       " equal to ggml_quantize_chunk")
    return out + [""]


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
                "Whole file: sling's output has the sha256 of the reference converter's on the same directory (header,"
                " version, every metadata key with its position, `general.*` naming keys included, tensor infos,"
                " alignment, padding, data). Cells: tensors identical / total, per fixture and `--type`, for files that are"
                " whole-file identical (**FILE DIFFERS** otherwise). * deepseekv3,"
                " deepseekv3-fp8: the reference ran on the fixture with `\"scoring_func\": \"sigmoid\"` stated in"
                " config.json, which transformers-saved DeepSeek-V3 configs leave out (sling's intended"
                " `deepseek2.expert_gating_func = 2`); against the fixture as it is, that key is the only difference.",
                "", "| fixture | " + " | ".join(TYPES) + " |", "|---|" + "---|" * len(TYPES)]
        n_ok, n_all = 0, 0
        for n in names:
            cells = []
            for t in TYPES:
                e = conv.get(f"{n}/{t}")
                if e is None:
                    cells.append("-")
                    continue
                ok = bool(e.get("file_identical"))
                n_all += 1
                n_ok += ok
                cells.append(f"{e['tensors_identical']}/{e['tensors_total']}"
                             + ("*" if "reference_config_states" in e else "")
                             + ("" if ok else " **FILE DIFFERS**"))
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out += ["", f"{n_ok} of {n_all} conversions whole-file identical (sha256)"
                + ("." if n_ok == n_all else "; see results/convert_bytes.json."), ""]

    nm, v = _load(results, "convert_naming")
    versions.update(v)
    if nm:
        n_ok = sum(bool(e.get("file_identical")) for e in nm.values())
        out += ["## Naming, sampling and model-card keys (convert_hf_to_gguf.py, whole file)", "",
                f"{n_ok} of {len(nm)} copies of fixtures, named and configured like real checkpoints, converted to the"
                " reference's file (sha256), and their `quantize --to gguf:Q4_K_M` to llama-quantize's from that file;"
                " the `general.*` keys the reference wrote:", "",
                "| case | directory | convert identical | Q4_K_M identical | reference's general.* keys |",
                "|---|---|---|---|---|"]
        for k, e in sorted(nm.items()):
            keys = ", ".join(f"`{x}`" for x in e.get("reference_general_keys", {})
                             if x not in ("general.type", "general.file_type", "general.quantization_version"))
            yn = lambda x: "yes" if x else "**NO**"  # noqa: E731
            out.append(f"| {k} | `{e.get('directory')}` | {yn(e.get('file_identical'))} |"
                       f" {yn(e.get('quantize_Q4_K_M_file_identical'))} | {keys} |")
        out.append("")

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
                " 64-token chunks; KLD base logits from the reference converter's F32 file. sling with its default"
                " `--as llama.cpp-cpu` (activations rounded as llama.cpp's CPU kernels round them). Limits: PPL within"
                " 0.5 %, mean KLD within 0.5 % relative (6 % for Q8_0 and MXFP4_MOE). `--as weights` (the weights'"
                " error alone) for comparison.",
                "", "| fixture | preset | PPL sling | PPL llama.cpp | gap | KLD sling | KLD llama.cpp | gap |"
                " KLD `--as weights` | top-1 sling / llama.cpp |", "|---|---|---|---|---|---|---|---|---|---|"]
        for k, e in sorted(ev.items()):
            s_, l_ = e["sling"], e["llama_perplexity"]
            w_ = e.get("sling_weights", {}).get("kld_mean")
            n, p = k.split("/", 1)
            out.append(f"| {n} | {p} | {s_['ppl']:.2f} | {l_['ppl']:.2f} | {100 * e['ppl_rel']:.2f} % |"
                       f" {s_['kld_mean']:.5f} | {l_['kld_mean']:.5f} | {100 * e['kld_rel']:.2f} % |"
                       f" {'—' if w_ is None else f'{w_:.5f}'} | {100 * s_['top1']:.1f} % / {100 * l_['top1']:.1f} % |")
        out.append("")

    et, v = _load(results, "eval_trained")
    versions.update(v)
    if et:
        out += ["## Evaluation on the trained fixture, reference-made candidates", "",
                "`convert_hf_to_gguf.py` + `llama-quantize` files of qwen3moe-trained; `sling eval` vs `llama-perplexity"
                " --kl-divergence` (100 × 128 tokens of eval.txt). `--as llama.cpp-cpu` (the default for a GGUF) rounds"
                " the activations as llama.cpp's CPU kernels do; `--as weights` measures the weights alone. The BF16 row"
                " is the source's weights: what llama.cpp's kernels add on their own (docs/eval.md).", "",
                "| candidate | KLD llama.cpp-cpu | KLD llama-perplexity | ratio | KLD weights | ratio |"
                " PPL llama.cpp-cpu / llama-perplexity | top-1 llama.cpp-cpu / llama-perplexity |",
                "|---|---|---|---|---|---|---|---|"]
        for k, e in sorted(et.items(), key=lambda kv: -kv[1]["sling"]["top1"]):
            s_, l_ = e["sling"], e["llama_perplexity"]
            m_ = e.get("sling_llama_cpp_cpu")
            ratio = f"{e['kld_ratio']:.2f}" if "kld_ratio" in e else "—"
            if m_ is None:
                emu = "— | — | — |"
                m_ = s_
            else:
                emu = f"{m_['kld_mean']:.6f} | {l_['kld_mean']:.6f} | {e['kld_ratio_llama_cpp_cpu']:.3f} |"
            out.append(f"| {k} | {emu} {s_['kld_mean']:.6f} | {ratio} |"
                       f" {m_['ppl']:.3f} / {l_.get('ppl_plain', l_['ppl']):.3f} |"
                       f" {100 * m_['top1']:.2f} % / {100 * l_['top1']:.2f} % |")
        out.append("")

    el, v = _load(results, "eval_logits")
    versions.update(v)
    if el:
        out += ["## `--as llama.cpp-cpu` against llama.cpp's own logits", "",
                "llama.cpp's logits (llama-cpp-python on the pinned build, KV cache F32, flash attention off) against"
                " `sling logits --gguf` on the same 128 token ids; KL(llama.cpp ‖ sling) per position. Limits: median"
                " within 15 % of the `--as weights` median; on the trained fixture below 1e-9.", "",
                "| fixture / candidate | positions at float precision (KL < 1e-9) | first other | median KL llama.cpp-cpu |"
                " median KL weights | mean KL llama.cpp-cpu | mean KL weights |", "|---|---|---|---|---|---|---|"]
        for k, e in sorted(el.items()):
            first = e.get("first_divergent_position")
            out.append(f"| {k} | {e['positions_at_float_precision']}/{e['tokens']} | {'—' if first is None else first} |"
                       f" {e['kl_median_llama.cpp-cpu']:.2g} | {e['kl_median_weights']:.2g} |"
                       f" {e['kl_mean_llama.cpp-cpu']:.2g} | {e['kl_mean_weights']:.2g} |")
        out.append("")

    split, v = _load(results, "split")
    versions.update(v)
    if split:
        out += ["## Split output", "", "| model | option | shards | tensors = reference's shards |"
                " shards whole-file = reference's | merged = unsplit | split-model logits = unsplit |",
                "|---|---|---|---|---|---|---|"]
        for k, e in sorted(split.items()):
            out.append(f"| {'/'.join(k.split('/')[:2])} | `{' '.join(e['args'])}` | {e['shards']} | "
                       f"{e['tensors_identical_to_reference']} | {e.get('shards_whole_file_identical', '-')} | "
                       f"{e['merged_tensors_identical']}/{e['tensors']} tensors | "
                       f"{'bit-identical' if e['logits_split_equal_unsplit'] else 'DIFFERENT'} |")
        out.append("")

    qs, v = _load(results, "quantize_split")
    versions.update(v)
    if qs:
        out += ["## Split quantize output vs llama-quantize + llama-gguf-split", "",
                "`sling quantize --split-*` against `llama-quantize` to one file, then `llama-gguf-split --split` with"
                " the same option: shard files compared whole (sha256).", "",
                "| model / preset / option | shards | shard files identical |", "|---|---|---|"]
        for k, e in sorted(qs.items()):
            n, same = e["shards"], e.get("files_identical")
            cell = "—" if same is None else f"{same}/{n}"
            out.append(f"| {k} | {n} | {cell} |")
        out.append("")

    qb, v = _load(results, "quantize_bytes")
    versions.update(v)
    if qb:
        plain = {k: e for k, e in qb.items() if k.count("/") == 1}
        other = {k: e for k, e in qb.items() if k.count("/") == 2}
        order = list(_PRESET_ORDER + _IQ_ORDER)
        presets = sorted({k.split("/")[1] for k in plain}, key=lambda p: order.index(p) if p in order else 99)
        models = sorted({k.split("/")[0] for k in plain})
        n_ok = sum(bool(e.get("file_identical")) for e in qb.values())
        out += ["## Quantization: byte identity with convert_hf_to_gguf.py --outtype bf16 + llama-quantize", "",
                f"{n_ok} of {len(qb)} cases whole-file identical (sha256: every tensor, every metadata key with its "
                "position, naming keys included, alignment and padding; DeepSeek-V3 fixtures from the reference "
                "conversion with the sigmoid gating stated, as above). Tensors identical / total per fixture and "
                "preset (**F**: the file differs); `-wide` fixtures have every dimension a multiple of 256 (K-quants "
                "on their main path), the others take llama-quantize's row fallbacks.", "",
                "| fixture | " + " | ".join(presets) + " |", "|---|" + "---|" * len(presets)]
        for m in models:
            cells = []
            for p in presets:
                e = plain.get(f"{m}/{p}")
                cells.append("" if e is None else f"{e['tensors_identical']}/{e['tensors_total']}"
                             + ("" if e.get("file_identical") else " **F**"))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        if other:
            out += ["", "With an imatrix (llama-imatrix output, GGUF and legacy .dat) and with llama-quantize flags given "
                    "to both tools:", "", "| variant | cases whole-file identical | fixtures | presets |",
                    "|---|---|---|---|"]
            groups: dict[str, list] = {}
            for k, e in other.items():
                m, p, var = k.split("/")
                groups.setdefault(var, []).append((m, p, e))
            for var, es in sorted(groups.items()):
                ok = sum(bool(e.get("file_identical")) for _, _, e in es)
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
        iq = [p for p in _IQ_ORDER if any(k.endswith(f"/{p}/imatrix") for k in ql)]
        if iq:
            out += ["", "The i-quant presets, with llama-imatrix's imatrix:", "",
                    "| fixture | " + " | ".join(iq) + " |", "|---|" + "---|" * len(iq)]
            for m in sorted({k.split("/")[0] for k in ql if k.endswith("/imatrix")}):
                out.append(f"| {m} | " + " | ".join(
                    (f"{ql[k]['kl_mean']:.3f} / {ql[k]['top1']:.2f}" if (k := f"{m}/{p}/imatrix") in ql else "")
                    for p in iq) + " |")
        out.append("")
    dry, v = _load(results, "quantize_iq_dry_run")
    if dry:
        out += ["## i-quant presets: per-tensor types vs `llama-quantize --dry-run`", "",
                f"{len(dry)} cases, every tensor's type equal (`sling plan --json`): " + ", ".join(sorted(dry)) + ".", ""]
    iqq, v = _load(results, "iq_quality")
    if iqq:
        out += ["## i-quant quality on the trained fixture (`sling eval` vs the bf16 source, eval.txt)", "",
                "| fixture | preset / recipe | bpw | KLD mean | PPL (source) | top-1 |", "|---|---|---|---|---|---|"]
        for k, e in sorted(iqq.items(), key=lambda kv: -kv[1]["bpw"]):
            m, p = k.split("/", 1)
            out.append(f"| {m} | {p} | {e['bpw']:.2f} | {e['kld_mean']:.4f} | {e['ppl']:.2f} ({e['ppl_ref']:.2f}) |"
                       f" {100 * e['top1']:.1f} % |")
        out.append("")

    for section, fn in (("vllm", _vllm), ("mlx", _mlx), ("mlx_convert", _mlx_convert), ("gptq", _gptq), ("awq", _awq), ("st_write", _st_write),
                        ("nonfinite", _nonfinite)):
        entries, v = _load(results, section)
        versions.update(v)
        out += fn(entries)

    if versions:
        out += ["## Tools", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(out)


if __name__ == "__main__":
    import sys
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"))
