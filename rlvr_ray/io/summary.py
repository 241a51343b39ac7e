"""The headline tables of ``rlvr-ray summary`` (and of the end of a scan), as SQL over the atlas."""

# (name, title, SQL): the name keys ``--format json`` and picks a table with ``--table``
SUMMARY_SECTIONS: list[tuple[str, str, str]] = [
    ("runs",
     "Per run: share of bf16 weights bitwise unchanged (sparsity) and of changes that moved 1 ULP",
     "SELECT group_name, run, algorithm, step, sparsity, ulp1_share FROM summary"),
    ("runs_geometry",
     "Per run: overlap of the update with principal / low-magnitude weights vs random baseline, "
     "median NSS and max principal angle (rad) over tensors",
     "SELECT group_name, run, algorithm, overlap_princ, princ_baseline, overlap_low, low_baseline, "
     "median_nss, median_max_angle FROM summary WHERE median_nss IS NOT NULL"),
    ("groups",
     "Per group: mean pairwise Jaccard of update masks vs the independent-Bernoulli baseline",
     "SELECT group_name, n_runs, round(mean_jaccard, 4) AS mean_jaccard, "
     "round(jaccard_baseline, 4) AS jaccard_baseline, "
     "round(mean_jaccard / nullif(jaccard_baseline, 0), 2) AS lift FROM group_summary "
     "ORDER BY group_name"),
]  # fmt: skip
