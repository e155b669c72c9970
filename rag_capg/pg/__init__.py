"""The policy-gradient core, on logit vectors over a corpus: Plackett-Luce sampling and log-probabilities
(policy), inclusion probabilities P(a in S) (inclusion), the estimators as surrogate losses (estimators),
and their CPU kernels (top_k, poisson_binomial, inclusion_approx_cpu, inclusion_exact_cpu). No text, no
models: everything here is tested against enumeration, Monte-Carlo and closed forms."""
