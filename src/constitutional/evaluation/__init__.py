"""The paper's evaluations: Elo from pairwise comparisons, harm and evasiveness judges, MC evals, the report."""
