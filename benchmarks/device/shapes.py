"""Model shapes the device benchmarks use (random init; the HF configs' sizes).

``tiny`` stands in for every shape in the CPU test of the device script."""

SHAPES = {
    # Qwen2.5-0.5B-Instruct's config.json
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                         tie_word_embeddings=True),
    # Qwen2.5-1.5B-Instruct's config.json
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
                         tie_word_embeddings=True),
    # the peers' 25.3M benchmark model (benchmarks/models.py), tied here
    "bench-25m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=6,
                      num_heads=8, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True),
}
