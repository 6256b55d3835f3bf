"""Demo and test material that needs no download: tiny random-weight replicas of real families (tiny), the sample
data (sample_data) and the synthetic world of the science demo (world) with its scores (world_scores)."""
