"""The curation report: what was read, what each rule removed (documents, bytes, examples), near
duplicate clusters and the LSH S-curve, the contamination gate, split sizes, throughput; printed as a table, saved as
report.json, with document- and token-length histograms in report.png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llm_jax.config import Config
from llm_jax.data.curate import Curated
from llm_jax.data.dedup import lsh_params

# Removal reasons in pipeline order: cleaning, the quality rules (curate.rules order), then dedup.
_BEFORE, _AFTER = ("empty",), ("exact_dup", "near_dup", "contamination")


def write_report(
    out_dir: Path,
    cfg: Config,
    cur: Curated,
    splits: dict[str, np.ndarray],
    doc_tokens: np.ndarray,
    contamination: dict,
    meta: dict,
    tokenize_seconds: float,
    log=print,
) -> dict:
    order = [r for r in _BEFORE + tuple(cfg.curate.rules) + _AFTER if r in cur.removed]
    read = cur.read
    report = {
        "read": {
            "files": read.files,
            "documents": read.documents,
            "bytes": read.bytes,
            "invalid_utf8_replaced": read.replaced_bytes,
            "skipped_files": read.skipped_files,
            "bad_rows": read.bad_rows,
            "examples": read.examples,
        },
        "removed": {rule: cur.removed[rule] for rule in order},  # rule -> [documents, bytes]
        "removed_examples": {rule: cur.examples[rule] for rule in order},
        "kept": {"documents": len(cur.scores), "bytes": int(cur.sizes[:, 0].sum())},
        "near_dup_clusters": cur.clusters,
        "near_dup_lsh": _s_curve(cfg.curate.near_dedup, cfg.curate.minhash_perms),
        "contamination_check": contamination,
        "splits": {
            split: {
                "documents": int(mask.sum()),
                "bytes": meta[f"{split}_bytes"],
                "tokens": meta[f"{split}_tokens"],
                "shards": len(meta["shards"][split]),
            }
            for split, mask in splits.items()
        },
        "throughput": {
            "curation_seconds": round(cur.seconds, 3),
            "curation_mb_per_s": round(read.bytes / 2**20 / max(cur.seconds, 1e-9), 3),
            "tokenize_pack_seconds": round(tokenize_seconds, 3),
            "tokenize_pack_tokens_per_s": round(int(doc_tokens.sum()) / max(tokenize_seconds, 1e-9)),
        },
        "histograms": "report.png",
    }
    if "mixture" in meta:  # data.mixture: each part's weights by step and tokens per split
        parts = meta["mixture"].items()
        report["mixture"] = {name: {k: v for k, v in part.items() if k != "shards"} for name, part in parts}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    _histograms(out_dir / "report.png", cur.sizes[:, 1], doc_tokens)
    for line in table(report):
        log(line)
    return report


def _s_curve(threshold: float | None, num_perm: int) -> dict | None:
    """The LSH bands and rows near dedup used and the chance that a pair of a given Jaccard becomes a
    candidate (then confirmed by its signature estimate): 1 - (1 - s^rows)^bands."""
    if not threshold:
        return None
    bands, rows = lsh_params(threshold, num_perm)
    points = sorted({0.5, 0.7, threshold, 0.9})
    return {
        "threshold": threshold,
        "bands": bands,
        "rows": rows,
        "candidate_probability": {f"{s:g}": round(1 - (1 - s**rows) ** bands, 4) for s in points},
    }


def table(report: dict) -> list[str]:
    read, kept = report["read"], report["kept"]
    lines = [
        f"read {read['documents']:,} documents, {read['bytes'] / 2**20:,.1f} MB from {read['files']} files"
        + (f"; skipped {read['skipped_files']} files (binary / unsupported)" if read["skipped_files"] else "")
        + (f"; {read['bad_rows']} bad rows" if read["bad_rows"] else "")
        + (
            f"; {read['invalid_utf8_replaced']} invalid UTF-8 sequences replaced"
            if read["invalid_utf8_replaced"]
            else ""
        ),
        f"{'removed by':<16}{'documents':>11}{'share':>8}{'MB':>9}",
    ]
    for rule, (n, n_bytes) in report["removed"].items():
        lines.append(f"{rule:<16}{n:>11,}{n / read['documents']:>8.1%}{n_bytes / 2**20:>9.2f}")
    lines.append(
        f"{'kept':<16}{kept['documents']:>11,}{kept['documents'] / read['documents']:>8.1%}"
        f"{kept['bytes'] / 2**20:>9.2f}"
    )
    c, t, lsh = report["contamination_check"], report["throughput"], report["near_dup_lsh"]
    if lsh:
        curve = ", ".join(f"{p:.2f} at {s}" for s, p in lsh["candidate_probability"].items())
        lines.append(
            f"near dedup at Jaccard {lsh['threshold']:g}: {lsh['bands']} bands x {lsh['rows']} rows, candidate {curve}"
        )
    lines.append(
        f"near-duplicate clusters: {report['near_dup_clusters']['clusters']} "
        f"(largest {report['near_dup_clusters']['largest']}); contamination gate ({c['ngram']}-grams): "
        f"{c['removed_train_documents']} training documents removed ("
        + ", ".join(f"{name}: {r['train_documents_hit']}" for name, r in c["references"].items())
        + ")"
    )
    lines.append(
        "splits: "
        + ", ".join(
            f"{s} {v['documents']:,} documents / {v['tokens']:,} tokens in {v['shards']} shards"
            for s, v in report["splits"].items()
        )
    )
    lines.append(
        f"throughput: curation {t['curation_mb_per_s']:.2f} MB/s, tokenize+pack "
        f"{t['tokenize_pack_tokens_per_s']:,} tokens/s"
    )
    return lines


def _histograms(path: Path, doc_words: np.ndarray, doc_tokens: np.ndarray) -> None:
    import matplotlib  # 0.5 s to import, for the PNG only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, values, label in ((axes[0], doc_words, "words per document"), (axes[1], doc_tokens, "tokens per document")):
        values = np.maximum(values, 1)
        bins = np.logspace(0, np.log10(values.max() + 1), 40)
        ax.hist(values, bins=bins)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("documents")
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
