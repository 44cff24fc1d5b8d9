"""A small ResNet-style CNN on scikit-learn's bundled 8x8 digits (fixed 1437 / 360 split).

Run:     jaxnv train digits_cnn
Time:    about 15 s on the reference 2-core CPU.
Result:  test accuracy 0.997 (359 of 360; at least 0.98 is tested).

Two stages (32 and 64 channels) of one residual block each, batch norm, global average pooling.
"""

from jaxnv.config import CNNConfig, Config, DataConfig, TrainConfig
from jaxnv.core.optim import OptimizerConfig


def config() -> Config:
    return Config(
        model=CNNConfig(features=(32, 64), blocks_per_stage=1, norm="batch"),
        data=DataConfig(name="digits"),
        optimizer=OptimizerConfig(
            name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=30, weight_decay=1e-4
        ),
        train=TrainConfig(
            steps=600,
            batch_size=64,
            eval_every=200,
            loss="softmax_ce",
            best_metric="accuracy",
            best_mode="max",
        ),
    )
