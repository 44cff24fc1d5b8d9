"""`jaxnv.fit` from a user's side: any NNX model, any loss, any data, checked against references
computed independently in plain numpy / JAX (never against numbers the loop itself produced)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnv

QUIET = {"progress": False, "mfu": False, "tensorboard": False}
ONE = jax.devices()[:1]
EIGHT = jax.devices()[:8]


# ----------------------------------------------------------------------------- models and data


class DropBN(nnx.Module):
    """Linear -> BatchNorm -> relu -> Dropout(0.5) -> Linear: eval and train mode differ."""

    def __init__(self, rngs, din=8, hidden=32):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.bn(self.l1(x)))))


class Plain(nnx.Module):
    """A two-layer MLP with no logical axis names and no non-param state."""

    def __init__(self, rngs, din=8, hidden=32, dout=1):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


class Sower(nnx.Module):
    """Sows its hidden activation as an nnx.Intermediate on every call."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.l1(x))
        self.sow(nnx.Intermediate, "h", h)
        return self.l2(h)


class TokenLM(nnx.Module):
    """Embedding + linear head over a tiny vocabulary."""

    def __init__(self, rngs, vocab=11, dim=8):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.embed(tokens))


def mse(model, batch, rng):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def lm_loss(model, batch, rng):
    logits = model(batch["x"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jaxnv.weighted_mean(ce, batch["mask"])


def regression_batches(n, batch=16, din=8, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(batch, din)).astype(np.float32),
            "y": rng.normal(size=(batch, 1)).astype(np.float32),
        }
        for _ in range(n)
    ]


def uneven_regression_batches(sizes, din=8, seed=1):
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(b, din)).astype(np.float32),
            "y": rng.normal(size=(b, 1)).astype(np.float32),
        }
        for b in sizes
    ]


VOCAB, SEQ = 11, 6


def token_batches(sizes, seed, pattern=(6, 1, 3, 2)):
    """Batches whose rows have very different real-token counts: row r of batch k keeps the first
    `pattern[(r + k) % 4]` positions (so micro-batches and devices see unequal counts)."""
    rng = np.random.default_rng(seed)
    out = []
    for k, b in enumerate(sizes):
        lengths = np.array([pattern[(r + k) % len(pattern)] for r in range(b)])
        mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.float32)
        out.append(
            {
                "x": rng.integers(0, VOCAB, size=(b, SEQ)).astype(np.int32),
                "y": rng.integers(0, VOCAB, size=(b, SEQ)).astype(np.int32),
                "mask": mask,
            }
        )
    return out


def pure_params(module):
    """The module's nnx.Param values as a nested dict of numpy copies."""
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def train_losses(history):
    return [(row["step"], row["loss"]) for row in history if row["split"] == "train"]


def assert_trees_close(a, b, rtol, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# numpy references -------------------------------------------------------------------------------


def np_linear(p, x):
    return np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(
        p["bias"], np.float64
    )


def np_dropbn_eval(params, model_state, x, eps=1e-5):
    """DropBN in eval mode: BatchNorm on its running statistics, no dropout."""
    h = np_linear(params["l1"], x)
    bn, stats = params["bn"], model_state["bn"]
    mean, var = (np.asarray(stats[k], np.float64) for k in ("mean", "var"))
    h = (h - mean) / np.sqrt(var + eps) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
    return np_linear(params["l2"], np.maximum(h, 0.0))


def np_plain(params, x):
    return np_linear(params["l2"], np.maximum(np_linear(params["l1"], x), 0.0))


def np_token_ce(params, batch):
    """Per-token cross-entropy of TokenLM, float64."""
    emb = np.asarray(params["embed"]["embedding"], np.float64)[batch["x"]]
    logits = np_linear(params["head"], emb)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, batch["y"][..., None], -1)[..., 0]


def example_mean(values_and_weights):
    values_and_weights = list(values_and_weights)
    total = sum(v * w for v, w in values_and_weights)
    return total / sum(w for _, w in values_and_weights)


# ------------------------------------------------------------- 1. dropout + batchnorm, eval mode

TRAIN_REG = regression_batches(4)
EVAL_REG = uneven_regression_batches((16, 16, 7))  # unequal: a mean of batch means would differ


@pytest.fixture(scope="module")
def dropbn_run():
    return jaxnv.fit(
        lambda rngs: DropBN(rngs),
        mse,
        TRAIN_REG,
        steps=5,
        optimizer=optax.adam(1e-2),
        eval_data=EVAL_REG,
        devices=ONE,
        log_every=1,
        **QUIET,
    )


def test_eval_loss_is_the_eval_mode_example_mean(dropbn_run):
    res = dropbn_run
    params, model_state = res.state.params, res.state.model_state
    by_hand = example_mean(
        (float(np.mean((np_dropbn_eval(params, model_state, b["x"]) - b["y"]) ** 2)), len(b["x"]))
        for b in EVAL_REG
    )
    assert res.eval_metrics["loss"] == pytest.approx(by_hand, rel=1e-6)
    # the same through the module the result hands back, switched to eval mode explicitly
    model = res.model
    model.eval()
    via_model = example_mean(
        (float(np.mean((np.asarray(model(b["x"])) - b["y"]) ** 2)), len(b["x"])) for b in EVAL_REG
    )
    assert res.eval_metrics["loss"] == pytest.approx(via_model, rel=1e-6)
    # eval mode matters here: the train-mode loss of the same model on the same data differs
    model.train()
    train_mode = example_mean(
        (float(np.mean((np.asarray(model(b["x"])) - b["y"]) ** 2)), len(b["x"])) for b in EVAL_REG
    )
    assert abs(train_mode - by_hand) > 1e-3 * abs(by_hand)
    # the model a result hands back is in eval mode already
    assert res.model.drop.deterministic and res.model.bn.use_running_average


def test_dropbn_trains_and_logs_every_step(dropbn_run):
    res = dropbn_run
    assert [s for s, _ in train_losses(res.history)] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(loss) for _, loss in train_losses(res.history))
    assert int(res.state.step) == 5
    assert [row["step"] for row in res.history if row["split"] == "eval"] == [5]


def test_batchnorm_statistics_follow_the_train_mode_batches():
    """With lr 0 the params stay at init, so BatchNorm's running stats after 3 steps are exactly
    the EMA (momentum 0.99) of the train batches' own statistics: train mode in the step, and
    the model state carried from step to step."""
    res = jaxnv.fit(
        lambda rngs: DropBN(rngs),
        mse,
        TRAIN_REG,
        steps=3,
        optimizer=optax.sgd(0.0),
        devices=ONE,
        **QUIET,
    )
    params = res.state.params
    mean, var = np.zeros(32), np.ones(32)
    for b in TRAIN_REG[:3]:
        h = np_linear(params["l1"], b["x"])
        mean = 0.99 * mean + 0.01 * h.mean(0)
        var = 0.99 * var + 0.01 * h.var(0)
    stats = res.state.model_state["bn"]
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ 2. a pretrained instance

KERNEL = (np.linspace(-1.0, 1.0, 8 * 32, dtype=np.float32).reshape(8, 32) * 0.37 + 0.0123).astype(
    np.float32
)


def pretrained():
    model = Plain(nnx.Rngs(123))
    model.l1.kernel[...] = jnp.asarray(KERNEL)
    model.l1.bias[...] = jnp.linspace(-0.5, 0.5, 32, dtype=jnp.float32)
    return model


def test_instance_starts_from_its_own_weights():
    model = pretrained()
    before = pure_params(model)
    first = TRAIN_REG[0]
    own_loss = float(np.mean((np_plain(before, first["x"]) - first["y"]) ** 2))
    res = jaxnv.fit(
        model, mse, TRAIN_REG, steps=1, optimizer=optax.sgd(0.0), log_every=1, devices=ONE, **QUIET
    )
    ((step, loss),) = train_losses(res.history)
    assert step == 1
    assert loss == pytest.approx(own_loss, rel=1e-6)
    assert_trees_close(res.state.params, before, rtol=0)  # lr 0: bit-identical
    # the user's instance is still intact and usable after the run
    assert_trees_close(pure_params(model), before, rtol=0)
    np.testing.assert_allclose(np.asarray(model(first["x"])), np_plain(before, first["x"]), 1e-5)


STABLEHLO_CONST = re.compile(r"constant[^\n]*tensor<8x32xf32>")
HLO_CONST = re.compile(r"f32\[8,32\]\{[^}]*\} constant\(")


def _embedded_constants(lowered):
    return STABLEHLO_CONST.findall(lowered.as_text()) + HLO_CONST.findall(
        lowered.as_text(dialect="hlo")
    )


def test_instance_weights_are_arguments_not_constants():
    x = np.ones((4, 8), np.float32)
    # the detector works: a function closing over the kernel embeds it
    assert _embedded_constants(jax.jit(lambda x: x @ KERNEL).lower(x))
    policy = jaxnv.get_policy("fp32")
    tx = optax.sgd(0.1)
    graphdef, state = jaxnv.init_state(pretrained(), tx, policy, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(state.params["l1"]["kernel"], KERNEL)
    step = jaxnv.make_train_step(graphdef, mse, tx, policy)
    lowered = step.fn.lower(state, TRAIN_REG[0])
    assert not _embedded_constants(lowered)


def test_fit_compiles_no_program_that_embeds_instance_weights(tmp_path):
    """Every program fit compiles for a pretrained instance (init, train, eval) takes its weights
    as arguments: JAX's own IR dump of everything compiled during the run holds no 8x32 constant
    (the dump catches one when a program does embed the kernel)."""
    dump = tmp_path / "ir"
    x = np.ones((3, 8), np.float32)
    jax.config.update("jax_dump_ir_to", str(dump))
    try:
        jax.jit(lambda x: x @ KERNEL)(x)  # the control: embeds the kernel
        control = set(dump.iterdir())
        jaxnv.fit(
            pretrained(),
            mse,
            TRAIN_REG,
            steps=2,
            optimizer=optax.sgd(0.1),
            eval_data=EVAL_REG[:1],
            devices=ONE,
            **QUIET,
        )
    finally:
        jax.config.update("jax_dump_ir_to", "")
    assert any(STABLEHLO_CONST.search(f.read_text()) for f in control)
    compiled = [f for f in dump.iterdir() if f not in control]
    assert len(compiled) >= 2  # at least the train and eval steps
    assert not [f.name for f in compiled if STABLEHLO_CONST.search(f.read_text())]


# ------------------------------------------------------------------------ 3. sown intermediates


@pytest.mark.parametrize("how", ["factory", "called instance"])
def test_model_that_sows_intermediates_trains(how):
    if how == "factory":
        model, start = (lambda rngs: Sower(rngs)), None
    else:
        model = Sower(nnx.Rngs(5))
        model(TRAIN_REG[0]["x"])  # holds sown values, as a model a user has tried out does
        start = pure_params(model)
    res = jaxnv.fit(
        model,
        mse,
        TRAIN_REG,
        steps=5,
        optimizer=optax.sgd(0.05),
        eval_data=EVAL_REG,
        log_every=1,
        devices=ONE,
        **QUIET,
    )
    losses = [loss for _, loss in train_losses(res.history)]
    assert len(losses) == 5 and np.all(np.isfinite(losses))
    assert np.isfinite(res.eval_metrics["loss"])
    if start is not None:
        changed = jax.tree.map(lambda a, b: not np.allclose(a, b), res.state.params, start)
        assert all(jax.tree.leaves(changed))
    else:
        assert losses[4] != losses[0]  # params moved: step 5 sees batch 0 again, another loss
    # the final model reproduces the eval loss (intermediates are outputs, not state)
    by_hand = example_mean(
        (float(np.mean((np_plain(res.state.params, b["x"]) - b["y"]) ** 2)), len(b["x"]))
        for b in EVAL_REG
    )
    assert res.eval_metrics["loss"] == pytest.approx(by_hand, rel=1e-6)


# -------------------------------------------------------- 4. data parallel equals one device


@pytest.fixture(scope="module")
def plain_runs():
    def run(devices, mesh=None):
        return jaxnv.fit(
            lambda rngs: Plain(rngs),
            mse,
            TRAIN_REG,
            steps=6,  # cycles the 4 batches
            optimizer=optax.adam(1e-2),
            mesh=mesh,
            devices=devices,
            log_every=1,
            **QUIET,
        )

    return run(ONE), run(EIGHT, {"data": 8})


def test_plain_model_on_eight_devices_matches_one(plain_runs):
    one, eight = plain_runs
    assert len(eight.state.params["l1"]["kernel"].sharding.device_set) == 8  # really on 8
    curve_one, curve_eight = train_losses(one.history), train_losses(eight.history)
    assert [s for s, _ in curve_one] == [s for s, _ in curve_eight] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in curve_eight], [v for _, v in curve_one], rtol=1e-5)
    assert_trees_close(eight.state.params, one.state.params, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 5. losses, errors, callbacks


def test_bare_scalar_loss_matches_plain_jax_sgd():
    model = Plain(nnx.Rngs(7))
    start = pure_params(model)
    res = jaxnv.fit(
        model, mse, TRAIN_REG, steps=5, optimizer=optax.sgd(0.1), log_every=1, devices=ONE, **QUIET
    )

    def ref_loss(p, b):
        h = jax.nn.relu(b["x"] @ p["l1"]["kernel"] + p["l1"]["bias"][None, :])
        return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"][None, :] - b["y"]) ** 2)

    p, losses = jax.tree.map(jnp.asarray, start), []
    for step in range(5):
        loss, g = jax.value_and_grad(ref_loss)(p, TRAIN_REG[step % len(TRAIN_REG)])
        losses.append(float(loss))
        p = jax.tree.map(lambda w, d: w - 0.1 * d, p, g)
    np.testing.assert_allclose([v for _, v in train_losses(res.history)], losses, rtol=1e-5)
    assert_trees_close(res.state.params, p, rtol=1e-5, atol=1e-6)


def per_example_loss(model, batch, rng):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2, axis=-1)  # (B,): forgot to reduce


def test_non_scalar_loss_is_one_line_naming_the_fix():
    with pytest.raises(ValueError) as err:
        jaxnv.fit(lambda r: Plain(r), per_example_loss, TRAIN_REG, steps=2, devices=ONE, **QUIET)
    msg = str(err.value)
    assert "\n" not in msg
    assert "scalar" in msg and (".mean()" in msg or "weighted_mean" in msg)


def test_non_scalar_loss_error_does_not_blame_the_batch():
    with pytest.raises(ValueError) as err:
        jaxnv.fit(lambda r: Plain(r), per_example_loss, TRAIN_REG, steps=2, devices=ONE, **QUIET)
    msg = str(err.value)
    assert "cannot take this batch" not in msg and "feature shape" not in msg


def _changing(change):
    def gen():
        for i in range(100):
            batch = dict(TRAIN_REG[i % len(TRAIN_REG)])
            if i == 3:
                batch = change(batch)
            yield batch

    return gen()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda b: {**b, "z": b["x"]}, id="new key"),
        pytest.param(lambda b: {"x": b["x"][:8], "y": b["y"][:8]}, id="smaller batch"),
        pytest.param(lambda b: {"x": b["x"].astype(np.int32), "y": b["y"]}, id="dtype"),
    ],
)
def test_batch_structure_change_mid_run_is_one_line(change):
    seen = []

    class Count(jaxnv.Callback):
        def on_step(self, info):
            seen.append(info.step)

    with pytest.raises(ValueError) as err:
        jaxnv.fit(
            lambda r: Plain(r),
            mse,
            _changing(change),
            steps=8,
            callbacks=[Count()],
            devices=ONE,
            **QUIET,
        )
    assert "\n" not in str(err.value)
    assert "batch" in str(err.value)
    assert seen == [1, 2, 3]  # the three good batches trained; the fourth was refused


class UserError(Exception):
    pass


def test_callback_exception_propagates_unchanged():
    class Boom(jaxnv.Callback):
        def on_log(self, step, split, scalars, state):
            raise UserError(f"user hook failed at {step} ({split})")

    with pytest.raises(UserError) as err:
        jaxnv.fit(
            lambda r: Plain(r),
            mse,
            TRAIN_REG,
            steps=4,
            log_every=2,
            callbacks=[Boom()],
            devices=ONE,
            **QUIET,
        )
    assert type(err.value) is UserError
    assert str(err.value) == "user hook failed at 2 (train)"


# ---------------------------------------------------------- 6. masked LM with weighted_mean

LM_TRAIN = token_batches((16, 16, 16), seed=10)
LM_EVAL = token_batches((16, 5, 9), seed=11)  # unequal batch sizes and token counts
LM_LR, LM_STEPS = 0.5, 3


@pytest.fixture(scope="module")
def lm_start():
    return pure_params(TokenLM(nnx.Rngs(21)))


@pytest.fixture(scope="module")
def lm_runs(lm_start):
    def run(micro=1, devices=ONE, mesh=None):
        model = TokenLM(nnx.Rngs(21))  # the same weights as lm_start, each run
        return jaxnv.fit(
            model,
            lm_loss,
            LM_TRAIN,
            steps=LM_STEPS,
            optimizer=optax.sgd(LM_LR),
            eval_data=LM_EVAL,
            micro_batches=micro,
            mesh=mesh,
            devices=devices,
            log_every=1,
            **QUIET,
        )

    return {"one": run(), "micro4": run(micro=4), "dp8": run(devices=EIGHT, mesh={"data": 8})}


def test_token_batches_really_have_unequal_micro_batch_counts():
    """The data this section relies on: a mean of micro-batch (or device) means would differ."""
    mask = LM_TRAIN[0]["mask"]
    strided = [mask[i::4].sum() for i in range(4)]  # micro-batch i holds rows i, i+4, ...
    per_device = [mask[2 * d : 2 * d + 2].sum() for d in range(8)]
    assert len(set(strided)) > 1 and len(set(per_device)) > 1
    assert len({float(b["mask"].sum()) / len(b["mask"]) for b in LM_EVAL}) > 1


def test_lm_one_device_matches_plain_jax_token_mean(lm_runs, lm_start):
    def ref_loss(p, b):
        logits = (
            p["embed"]["embedding"][b["x"]] @ p["head"]["kernel"] + p["head"]["bias"][None, None]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])
        return jnp.sum(ce * b["mask"]) / jnp.sum(b["mask"])

    p, losses = jax.tree.map(jnp.asarray, lm_start), []
    for step in range(LM_STEPS):
        loss, g = jax.value_and_grad(ref_loss)(p, LM_TRAIN[step])
        losses.append(float(loss))
        p = jax.tree.map(lambda w, d: w - LM_LR * d, p, g)
    res = lm_runs["one"]
    np.testing.assert_allclose([v for _, v in train_losses(res.history)], losses, rtol=1e-5)
    assert_trees_close(res.state.params, p, rtol=1e-5, atol=1e-6)


def test_lm_micro_batches_equal_one_batch(lm_runs):
    one, micro = lm_runs["one"], lm_runs["micro4"]
    assert_trees_close(micro.state.params, one.state.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        [v for _, v in train_losses(micro.history)],
        [v for _, v in train_losses(one.history)],
        rtol=1e-6,
    )


def test_lm_eval_is_the_token_mean_over_the_split(lm_runs):
    res = lm_runs["one"]
    total = sum(float((np_token_ce(res.state.params, b) * b["mask"]).sum()) for b in LM_EVAL)
    tokens = sum(float(b["mask"].sum()) for b in LM_EVAL)
    assert res.eval_metrics["loss"] == pytest.approx(total / tokens, rel=1e-6)


def test_lm_eight_devices_equal_one(lm_runs):
    one, dp = lm_runs["one"], lm_runs["dp8"]
    assert len(dp.state.params["head"]["kernel"].sharding.device_set) == 8
    assert_trees_close(dp.state.params, one.state.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        [v for _, v in train_losses(dp.history)],
        [v for _, v in train_losses(one.history)],
        rtol=1e-5,
    )
    assert dp.eval_metrics["loss"] == pytest.approx(one.eval_metrics["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- 7. early stopping


def test_early_stopping_stops_when_the_metric_plateaus():
    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.2, 3.1] + [3.0] * 100)  # best at eval 3, then flat

    def score(model, data):
        return {"score": next(scripted)}

    patience, steps = 3, 40
    res = jaxnv.fit(
        lambda r: Plain(r),
        mse,
        TRAIN_REG,
        steps=steps,
        optimizer=optax.sgd(0.01),
        eval_data=EVAL_REG[:1],
        eval_every=1,
        evaluators={"score": score},
        callbacks=[jaxnv.EarlyStopping("score", patience=patience)],
        devices=ONE,
        **QUIET,
    )
    evals = [row for row in res.history if row["split"] == "eval"]
    assert [row["score"] for row in evals] == [5.0, 4.0, 3.0, 3.5, 3.2, 3.1]
    assert res.history[-1]["step"] == 3 + patience < steps
    assert int(res.state.step) == 3 + patience


# --------------------------------------------------------------------------- 8. custom evaluator


def test_custom_evaluator_metrics_are_reported():
    rng = np.random.default_rng(4)
    eval_data = [
        {
            "x": rng.normal(size=(b, 8)).astype(np.float32),
            "y": rng.integers(0, 3, size=(b,)).astype(np.int32),
        }
        for b in (16, 7)
    ]
    train = [
        {
            "x": rng.normal(size=(16, 8)).astype(np.float32),
            "y": rng.integers(0, 3, size=(16,)).astype(np.int32),
        }
        for _ in range(3)
    ]

    def ce(model, batch, rng):
        logits = model(batch["x"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

    modes = []

    def accuracy(model, data):
        modes.append(model.drop.deterministic)
        hits = sum(int((np.argmax(model(b["x"]), -1) == b["y"]).sum()) for b in data)
        return {"accuracy": hits / sum(len(b["y"]) for b in data)}

    class Classifier(nnx.Module):
        def __init__(self, rngs):
            self.body = Plain(rngs, dout=3)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.body(x))

    res = jaxnv.fit(
        lambda r: Classifier(r),
        ce,
        train,
        steps=4,
        optimizer=optax.adam(0.05),
        eval_data=eval_data,
        eval_every=2,
        evaluators={"acc": accuracy},
        devices=ONE,
        **QUIET,
    )
    assert modes == [True, True]  # evaluated at steps 2 and 4, in eval mode (no dropout)
    params = res.state.params["body"]
    hits = sum(int((np.argmax(np_plain(params, b["x"]), -1) == b["y"]).sum()) for b in eval_data)
    assert res.eval_metrics["accuracy"] == pytest.approx(hits / 23, abs=1e-12)
    assert "loss" in res.eval_metrics
    evals = [row for row in res.history if row["split"] == "eval"]
    assert [row["step"] for row in evals] == [2, 4] and all("accuracy" in r for r in evals)


# ------------------------------------------------------------------------- 9. on_step callbacks


def test_on_step_gets_host_floats_every_step():
    seen = []

    class Record(jaxnv.Callback):
        def on_step(self, info):
            seen.append((info.step, info.metrics))

    steps = 7
    res = jaxnv.fit(
        lambda r: Plain(r),
        mse,
        TRAIN_REG,
        steps=steps,
        optimizer=optax.sgd(0.05),
        callbacks=[Record()],
        log_every=1,
        devices=ONE,
        **QUIET,
    )
    assert [s for s, _ in seen] == list(range(1, steps + 1))
    for _, metrics in seen:
        assert metrics and all(type(v) is float for v in metrics.values())
    np.testing.assert_allclose(
        [m["loss"] for _, m in seen], [v for _, v in train_losses(res.history)], rtol=1e-7
    )
