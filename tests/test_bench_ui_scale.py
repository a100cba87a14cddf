"""The 1,000,000-row UI benchmark's synthetic table (bench/bench_ui_scale.py), at 5,000 rows."""
from __future__ import annotations

import numpy as np


def test_synthetic_table_is_a_jittered_draw_of_the_real_one(scored_sample, tmp_path):
    from bench.bench_ui_scale import install, synthetic
    from explain.score import read, scored_table
    from models.zoo import default_model_name

    real = scored_table(default_model_name(), scored_sample)
    df, emb, src = synthetic(real, 5_000, seed=1)
    t = real.table
    assert len(df) == len(emb) == len(src) == 5_000
    assert df["row"].tolist() == list(range(5_000))
    assert t["readable"].to_numpy()[src].all() and set(np.flatnonzero(t["readable"].to_numpy())) <= set(src)
    assert (df["relpath"].to_numpy() == t["relpath"].to_numpy()[src]).all()  # each copy shows its source image
    leaf = real.levels[-1]
    assert (df[f"pred_{leaf}"].to_numpy() == t[f"pred_{leaf}"].to_numpy()[src]).all()
    score = f"ood_msp_{leaf}"
    moved = np.abs(df[score].to_numpy() - t[score].to_numpy()[src])
    assert 0 < np.nanmedian(moved) < 0.5 * np.nanstd(t[score].to_numpy())  # jittered, not replaced
    assert emb.dtype == np.float16 and emb.shape[1] == real.embeddings.shape[1]
    assert not np.array_equal(emb[:10], np.asarray(real.embeddings)[src[:10]])

    out = tmp_path / "table"
    out.mkdir()
    info = install(real, out, df, emb, src, with_map=False)
    assert info["rows"] == 5_000
    got = read(out)
    assert len(got.table) == 5_000 and got.embeddings.shape == emb.shape
    assert got.meta["rows"] == real.meta["rows"] and got.meta["synthetic_rows"] == 5_000
    for lvl in real.levels:
        assert got.proba(lvl).shape == (5_000, real.proba(lvl).shape[1])
        assert np.array_equal(got.proba(lvl)[:50], real.proba(lvl)[src[:50]], equal_nan=True)
