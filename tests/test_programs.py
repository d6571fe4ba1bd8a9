"""A differential test of programs, not of calls: a hypothesis state machine runs a rule's stock class
(RMSprop in half the programs, any setting of any rule in the others: ``trajectory.rule_settings``),
``cpu_kernel`` and sometimes another variant side by side, and between
their steps does what a training program does: keeps old parameters, v's and returned trees; views,
slices, reshapes, ties and overwrites parameters and state entries; shares and replaces state dicts;
casts, adds and drops leaves; steps lazily or evaluated, from a second thread too; under a float or
scheduled learning rate, with float32, float16 and bfloat16 leaves, small (packed) and one big
(graph) leaf.

The oracle, after every rule: every array the program holds has stock's bits. A step that raises
in a variant must raise in stock too (the same type, or a subclass: a ``TreeMismatchError`` is
stock's ``ValueError``) and leave the variant's state as it was; stock itself is rolled back there,
since stock writes its state leaf by leaf. ``RMSPROP_PROGRAM_EXAMPLES`` sets how many programs run
(the sanitizer lane raises it); the test reports how many programs and steps it ran."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from hypothesis import HealthCheck, Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from mlx.utils import tree_flatten
from program_oracle import ALIASES, ALPHA, EPS, LR, VARIANTS, bits, changed_since, differences, make, snapshot
from trajectory import gradient_sequence, rule_settings, setting_id

from rmsprop_impls.rules import rule as rule_named

pytestmark = pytest.mark.skipif("cpu_kernel" not in VARIANTS, reason="cpu_kernel does not run here")

EXAMPLES = int(os.environ.get("RMSPROP_PROGRAM_EXAMPLES", "40"))
#: Shrinking a failing program can take hypothesis its full five minutes; RMSPROP_PROGRAM_SHRINK=1 asks for it.
PHASES = [p for p in Phase if p != Phase.shrink or os.environ.get("RMSPROP_PROGRAM_SHRINK") == "1"]
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
SMALL_SIZES = [1, 7, 300, 4097]
BIG_SIZE = 262_147  # past the kernel's 256K-element packing limit: the graph path
SCHEDULES = {
    "float": LR,
    "cosine": optim.cosine_decay(LR, 12),
    "callable": lambda step: LR / (1 + step.astype(mx.float32)),
}
COUNTS = {"programs": 0, "steps": 0}
OTHERS = [v for v in VARIANTS if v != "cpu_kernel"]
#: Half the programs run the RMSprop the sanitizer lane fuzzes the kernel with, the others any rule's setting.
RMSPROP = ("rmsprop", {"alpha": ALPHA, "eps": EPS})
SETTINGS = st.one_of(st.just(RMSPROP), st.sampled_from(rule_settings()))


def random_leaf(size: int, dtype: mx.Dtype, seed: int) -> mx.array:
    x = mx.random.normal((size,), key=mx.random.key(seed)).astype(dtype)
    mx.eval(x)
    return x


class World:
    """One side of the program: an optimizer, the parameters, and what the program keeps."""

    def __init__(self, variant: str, learning_rate, leaves: dict, setting: tuple[str, dict]):
        self.variant = variant
        self.opt = make(variant, learning_rate, *setting)
        #: The rule's state arrays; the program's state rules act on the first (``v`` for RMSprop).
        self.states = rule_named(setting[0]).states
        self.params = {name: random_leaf(*spec) for name, spec in leaves.items()}  # this world's own arrays
        self.kept: dict = {}

    def gradients(self, seed: int, lazy: bool) -> dict:
        g = gradient_sequence(self.params, 1, seed)[0]
        return {k: x * 1 for k, x in g.items()} if lazy else g

    def step(self, seed: int, lazy: bool = False, evaluate: bool = True) -> None:
        self.params = self.opt.apply_gradients(self.gradients(seed, lazy), self.params)
        if evaluate:
            mx.eval(self.params, self.opt.state)

    def step_the_model(self, seed: int, lazy: bool) -> None:
        """``optimizer.update(model, gradients)``, as mlx-examples step: the parameters become an
        ``nn.Module`` (a dict), which the step updates where it is instead of rebinding it."""
        if not isinstance(self.params, nn.Module):
            model = nn.Module()
            for name, x in self.params.items():
                model[name] = x
            self.params = model
        self.opt.update(self.params, self.gradients(seed, lazy))
        mx.eval(self.params.parameters(), self.opt.state)

    def held(self) -> dict:
        return {"params": self.params, "state": self.opt.state, "kept": self.kept}

    def references(self) -> tuple:
        """The state's and parameters' objects, to put stock back where it raised half-way."""
        state = self.opt.state
        entries = {k: (s, {n: s.get(n) for n in self.states} if isinstance(s, dict) else {}) for k, s in state.items()}
        return dict(self.params), entries, self.opt._initialized

    def restore(self, references: tuple) -> None:
        params, entries, initialized = references
        self.params = params
        self.opt._initialized = initialized  # stock's init may have run before it raised
        state = self.opt.state
        for k in list(state):
            if k not in entries:
                del state[k]
        for k, (s, arrays) in entries.items():
            state[k] = s
            for n, x in arrays.items():
                if x is not None:
                    s[n] = x


def attempt(action, world: World):
    try:
        action(world)
    except Exception as e:  # noqa: BLE001 (the oracle compares any error with stock's)
        return e
    return None


class Programs(RuleBasedStateMachine):
    """The same program on every world; after each rule, stock's bits everywhere."""

    def __init__(self):
        super().__init__()
        self.worlds: list[World] = []
        COUNTS["programs"] += 1

    @initialize(
        other=st.sampled_from([None, *OTHERS]),
        schedule=st.sampled_from(list(SCHEDULES)),
        small=st.lists(st.tuples(st.sampled_from(SMALL_SIZES), st.sampled_from(DTYPES)), min_size=1, max_size=4),
        big_dtype=st.sampled_from(DTYPES),
        seed=st.integers(0, 2**16),
        setting=SETTINGS,
    )
    def start(self, other, schedule, small, big_dtype, seed, setting):
        leaves = {f"l{i}": (size, dtype, seed + i) for i, (size, dtype) in enumerate(small)}
        leaves["twin"] = (*small[0][:2], seed + 100)  # one shape and dtype twice: ties and sharing have a pair
        leaves["big"] = (BIG_SIZE, big_dtype, seed + 101)
        names = ["stock", "cpu_kernel"] + ([other] if other else [])
        self.worlds = [World(name, SCHEDULES[schedule], leaves, setting) for name in names]
        event(f"third variant: {other}")
        event(f"rule: {setting_id(*setting)}")
        shapes = [(k, s, str(d)) for k, (s, d, _) in leaves.items()]
        note(f"worlds {names}, {setting}, learning rate {schedule}, leaves {shapes}")

    # ------------------------------------------------------------------ the oracle ---

    def each(self, action) -> None:
        """``action`` on every world; a variant's error must be stock's and change nothing."""
        stock, variants = self.worlds[0], self.worlds[1:]
        before = {w.variant: snapshot(w.opt.state) for w in variants}
        references = stock.references()
        stock_error = attempt(action, stock)
        if stock_error is not None:
            stock.restore(references)
        for w in variants:
            error = attempt(action, w)
            if error is None:
                assert stock_error is None, f"{w.variant} ran where stock raised {stock_error!r}"
                continue
            assert isinstance(error, type(stock_error)), f"{w.variant} raised {error!r}, stock {stock_error!r}"
            changed = changed_since(w.opt.state, before[w.variant])
            assert not changed, f"{w.variant} raised {error!r} and changed {changed}"
        if stock_error is not None:
            event(f"every world raised {type(stock_error).__name__}")

    @invariant()
    def every_array_has_stocks_bits(self):
        if not self.worlds:
            return
        want = self.worlds[0].held()
        for w in self.worlds[1:]:
            wrong = differences(w.held(), want)
            assert not wrong, f"{w.variant}: " + "; ".join(wrong[:6])

    def leaf(self, i: int) -> str:
        names = list(self.worlds[0].params)
        return names[i % len(names)]

    def each_on_a_pair(self, i: int, action) -> None:
        """``action(world, a, b)`` on two leaves of one shape and dtype (a tie or a share needs them), if any."""
        p = self.worlds[0].params
        names = list(p)
        a = names[i % len(names)]
        same = [b for b in names if b != a and p[b].shape == p[a].shape and p[b].dtype == p[a].dtype]
        if same:
            b = same[i % len(same)]
            self.each(lambda w: action(w, a, b))

    # --------------------------------------------------------------------- steps ---

    @rule(seed=st.integers(0, 2**16), lazy=st.booleans(), evaluate=st.booleans())
    def step(self, seed, lazy, evaluate):
        COUNTS["steps"] += 1
        self.each(lambda w: w.step(seed, lazy, evaluate))

    @rule(seed=st.integers(0, 2**16), lazy=st.booleans())
    def step_the_model(self, seed, lazy):
        COUNTS["steps"] += 1
        self.each(lambda w: w.step_the_model(seed, lazy))

    @rule(seed=st.integers(0, 2**16), n=st.integers(2, 3))
    def lazy_steps(self, seed, n):
        """Steps on lazy gradients and parameters, nothing evaluated in between."""
        COUNTS["steps"] += n

        def run(w):
            for k in range(n):
                w.step(seed + k, lazy=True, evaluate=False)

        self.each(run)

    @rule(seed=st.integers(0, 2**16))
    def step_in_another_thread(self, seed):
        """One step in a second thread while this one reads what the program keeps (serialized per
        world, so that the oracle is defined)."""
        COUNTS["steps"] += 1

        def run(w):
            mx.eval(w.params, w.opt.state, w.kept)  # MLX evaluates a graph only on the thread that made it
            errors = []
            worker = threading.Thread(target=lambda: errors.append(attempt(lambda w: w.step(seed), w)))
            worker.start()
            for _, x in tree_flatten(w.kept):
                bits(x)
            worker.join()
            if errors[0] is not None:
                raise errors[0]

        self.each(run)

    @rule(seed=st.integers(0, 2**16), i=st.integers(0, 99))
    def step_with_a_wrong_shape(self, seed, i):
        """A gradient one element too long: stock raises too (one of more than one element does not broadcast)."""
        names = [k for k, x in self.worlds[0].params.items() if x.size > 1]
        if not names:
            return
        name = names[i % len(names)]

        def run(w):
            g = w.gradients(seed, lazy=False)
            g[name] = mx.ones((g[name].size + 1,), g[name].dtype)
            w.params = w.opt.apply_gradients(g, w.params)

        self.each(run)

    # ------------------------------------------------------ what a program keeps ---

    @rule(i=st.integers(0, 99), what=st.sampled_from(["parameter", "v", "tree", "slice", "lazy slice"]))
    def keep(self, i, what):
        name = self.leaf(i)

        def run(w):
            key = f"{what} {name} {len(w.kept)}"
            if what == "parameter":
                w.kept[key] = w.params[name]
            elif what == "v":
                w.kept[key] = w.opt.state[name][w.states[0]]
            elif what == "tree":
                w.kept[key] = dict(w.params)
            else:
                w.kept[key] = w.params[name][: max(1, w.params[name].size // 2)]
                if what == "slice":
                    mx.eval(w.kept[key])

        self.each(run)

    @rule(i=st.integers(0, 99))
    def forget_what_was_kept(self, i):
        def run(w):
            if w.kept:
                del w.kept[list(w.kept)[i % len(w.kept)]]

        self.each(run)

    # ---------------------------------------------------------- parameters ---

    @rule(i=st.integers(0, 99))
    def tie_in_place(self, i):
        def run(w, a, b):
            w.params[b][:] = mx.stop_gradient(w.params[a])

        self.each_on_a_pair(i, run)

    @rule(i=st.integers(0, 99), how=st.sampled_from(["zeros", "reshaped", "a slice of a bigger array", "one element"]))
    def overwrite(self, i, how):
        name = self.leaf(i)

        def run(w):
            x = w.params[name]
            if how == "zeros":
                w.params[name] = mx.zeros_like(x)
            elif how == "reshaped":
                w.params[name] = mx.reshape(mx.reshape(x, (1, -1)), x.shape)
            elif how == "a slice of a bigger array":
                w.params[name] = mx.concatenate([x, x])[x.size :]
            else:
                x[0] = 0.5

        self.each(run)

    @rule(i=st.integers(0, 99), dtype=st.sampled_from(DTYPES))
    def cast(self, i, dtype):
        name = self.leaf(i)

        def run(w):
            w.params[name] = w.params[name].astype(dtype)

        self.each(run)

    @rule(size=st.sampled_from(SMALL_SIZES), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
    def add_leaf(self, size, dtype, seed):
        def run(w):
            w.params[f"added{seed}"] = random_leaf(size, dtype, seed)
            w.opt.init(w.params)

        self.each(run)

    @rule(i=st.integers(0, 99))
    def drop_leaf(self, i):
        if len(self.worlds[0].params) < 2:
            return
        name = self.leaf(i)

        def run(w):
            del w.params[name]

        self.each(run)

    # --------------------------------------------------------------- the state ---

    @rule(i=st.integers(0, 99), how=st.sampled_from(list(ALIASES)))
    def v_over_anothers_buffer(self, i, how):
        def run(w, a, b):
            v = w.states[0]
            w.opt.state[b][v] = ALIASES[how](w.opt.state[a][v])
            mx.eval(w.opt.state[b][v])

        self.each_on_a_pair(i, run)

    @rule(i=st.integers(0, 99), seed=st.integers(0, 2**16))
    def vs_from_overlapping_slices(self, i, seed):
        def run(w, a, b):
            first = w.states[0]
            v = w.opt.state[a][first]
            n = v.size
            base = mx.abs(random_leaf(n + n // 2 + 1, v.dtype, seed))
            mx.eval(base)
            w.opt.state[a][first], w.opt.state[b][first] = base[:n], base[n // 2 + 1 :]

        self.each_on_a_pair(i, run)

    @rule(i=st.integers(0, 99))
    def share_a_state_dict(self, i):
        def run(w, a, b):
            w.opt.state[b] = w.opt.state[a]

        self.each_on_a_pair(i, run)

    @rule(i=st.integers(0, 99), seed=st.integers(0, 2**16), ordered=st.booleans())
    def replace_a_state_dict(self, i, seed, ordered):
        name = self.leaf(i)

        def run(w):
            old = w.opt.state[name]
            new = {
                n: mx.abs(random_leaf(x.size, x.dtype, seed + i)).reshape(x.shape)
                for i, (n, x) in enumerate(old.items())
            }
            w.opt.state[name] = OrderedDict(new) if ordered else new

        self.each(run)


def test_programs_against_stock(capsys):
    before = dict(COUNTS)
    try:
        run_state_machine_as_test(
            Programs,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=20,
                deadline=None,
                phases=PHASES,
                report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        with capsys.disabled():  # shown without -s too, and when a program fails
            print(
                f"\ntest_programs: {COUNTS['programs'] - before['programs']} programs, "
                f"{COUNTS['steps'] - before['steps']} steps against stock"
            )
