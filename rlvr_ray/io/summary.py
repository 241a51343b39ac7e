"""The headline tables of ``rlvr-ray summary`` (and of the end of a scan), as SQL over the atlas."""

SUMMARY_SECTIONS: list[tuple[str, str]] = [
    ("Per run: share of bf16 weights bitwise unchanged (sparsity) and of changes that moved 1 ULP",
     "SELECT group_name, run, algorithm, step, sparsity, ulp1_share FROM summary"),
    ("Per run: overlap of the update with principal / low-magnitude weights vs random baseline, "
     "median NSS and max principal angle (rad) over tensors; overlaps and angles over tensors "
     "with geometry_status 'ok' only (geometry_flagged: the others)",
     "SELECT group_name, run, algorithm, overlap_princ, princ_baseline, overlap_low, low_baseline, "
     "median_nss, median_max_angle, geometry_flagged FROM summary WHERE median_nss IS NOT NULL"),
    ("Per group: mean pairwise Jaccard of update masks vs the independent-Bernoulli baseline",
     "SELECT group_name, n_runs, round(mean_jaccard, 4) AS mean_jaccard, "
     "round(jaccard_baseline, 4) AS jaccard_baseline, "
     "round(mean_jaccard / nullif(jaccard_baseline, 0), 2) AS lift FROM group_summary "
     "ORDER BY group_name"),
]  # fmt: skip
