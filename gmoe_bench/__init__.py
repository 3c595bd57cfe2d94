"""gmoe-bench: config-driven experiments for Graph Mixture of Experts on OGB molecules."""
