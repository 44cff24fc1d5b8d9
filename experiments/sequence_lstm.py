"""An LSTM on the adding problem: read 50 (value, marker) pairs, output the sum of the 2 marked.

Why this task: it is the classic test of recurrent memory (Hochreiter & Schmidhuber, 1997). The
answer depends on two inputs that can be up to 49 steps apart, with distracting values between
them, so a model without memory cannot beat predicting the mean (mse 1/6 = 0.167). It needs no
download and its difficulty is set by one number (data.seq_len).

Run:     jaxnv train sequence_lstm
Time:    about 20 s on the reference 2-core CPU.
Result:  eval mse about 0.0006 (against 0.167 for the best memoryless guess).
"""

from jaxnv.config import Config, DataConfig, LSTMConfig, TrainConfig
from jaxnv.core.optim import OptimizerConfig


def config() -> Config:
    return Config(
        model=LSTMConfig(features=(64,)),
        data=DataConfig(name="adding", num_train=8000, num_eval=1000, seq_len=50),
        optimizer=OptimizerConfig(
            name="adam", learning_rate=3e-3, schedule="cosine", warmup_steps=50, clip_norm=1.0
        ),
        train=TrainConfig(steps=1500, batch_size=64, eval_every=500, loss="mse"),
    )
