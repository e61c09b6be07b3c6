"""How a bench result reads: the summary table printed at the end, and the one-line progress messages.

    python -m studies.bench --preset quick --batches 8 --steps 3 --warmup 2 --fid-samples 32 --workers 0
"""

from __future__ import annotations


def _fmt(value: float | None, spec: str) -> str:
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)


def table(result: dict) -> str:
    """The printed summary: one line per batch and trainer variant, then FID."""
    gflop = None if result["flops_per_img"] is None else result["flops_per_img"] / 1e9
    lines = [f"device: {result['device']}, torch {result['torch']}; one training step = {_fmt(gflop, '.2f')} GFLOP "
             f"per image; MFU against {result['peak_tflops']:g} TFLOP/s",
             f"{'batch':>5}  {'trainer':<28} {'img/s':>9} {'plain':>8} {'ratio':>6} {'MFU':>6} {'mem GiB':>8} "
             f"{'plain GiB':>9} {'loss diff':>9}"]
    if not result["suite"]:
        lines = lines[:1] if result["flops_per_img"] else []
    plain = {row["batch"]: row for row in result["plain"]}
    for row in result["suite"]:
        p = plain.get(row["batch"], {})
        if row.get("error"):
            lines.append(f"{row['batch']:>5}  {row['variant']:<28} failed: {row['error'][:80]}")
            continue
        mfu = None if row.get("mfu") is None else 100 * row["mfu"]
        lines.append(f"{row['batch']:>5}  {row['variant']:<28} {row['img_per_s']:>9.0f} "
                     f"{_fmt(p.get('img_per_s'), '8.0f')} {_fmt(row.get('ratio'), '5.2f')}x {_fmt(mfu, '5.1f')}% "
                     f"{_fmt(row['peak_mem_gib'], '8.2f')} {_fmt(p.get('peak_mem_gib'), '9.2f')} "
                     f"{_fmt(row['loss_check']['max_rel_diff'], '9.1e')}")
    lines += [fid_line(f) for f in result["fid"]]
    if result.get("resize_check"):
        lines.append(resize_line(result["resize_check"]))
    return "\n".join(lines)


def fid_line(f: dict) -> str:
    return (f"FID with {f['samples']} samples, resize {f['resize']}: {f['seconds']:.2f} s "
            f"(setup {f['setup_seconds']:.1f} s), FID {f['value']:.3f}")


def resize_line(c: dict) -> str:
    return (f"resize check, {c['images_per_side']} vs {c['images_per_side']} real images at {c['resolution']}px: "
            f"FID clean {c['fid_clean']:.4f}, torch {c['fid_torch']:.4f}, relative difference "
            f"{100 * c['fid_rel_diff']:.3f}%, max pixel difference {c['pixel_max_abs_diff']:.1e}")
