"""The Triton fused step (``psiopt.optim.triton_rows``), without a GPU.

The kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), selected with
``psiopt.optim.kernels.TRITON_ON_CPU`` (``PSIOPT_TRITON_CPU=1``): every rule with a fused kernel
and its settings, several tensors of different shapes in one group, the groupings channel (rows
in registers: one launch), groups:2, tensor and a part (with ``MAX_BLOCK`` 16: rows longer than a
block split into chunks, one program per chunk in two launches, beside the short rows' launch),
against the reference path (``foreach=False``) in float64 (1e-12), float32, bfloat16 and
float16.  The same rule definitions
(``psiopt.optim.rowrules``) also run with torch (``rowrules.evaluate``) against the reference path,
and every rule's kernel is compiled by Triton for an sm_90 GPU (to a cubin: the compiler's own
checks, which the interpreter does not make).  Whether the kernels run right and fast on a GPU
only a GPU can tell (``make gpu-check``).
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]'); CI installs it")

import psiopt  # noqa: E402
from psiopt.optim import kernels, rowrules, triton_rows  # noqa: E402
from psiopt.optim.rowrules import safe_inv, sqrt, where  # noqa: E402  (the test rule's helpers)

#: (registered name, settings) reaching every branch of the rule definitions
CASES = [
    ("psi-sgd", {"lr": 0.5}),
    ("psi-sgdm", {"lr": 0.1, "momentum": 0.9}),
    ("psi-sgdm", {"lr": 0.1, "momentum": 0.9, "fixed_norm": False, "weight_decay": 1e-2}),
    ("psgd", {"lr": 0.1}),
    ("psgd", {"lr": 0.1, "momentum": 0.9}),
    ("un-sgd", {"lr": 0.05}),
    ("adamg-star", {"lr": 0.1, "weight_decay": 5e-4}),
    ("sgdmrt", {"lr": 0.1, "momentum": 0.9}),
    ("sgdmrt", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
    ("adams", {"lr": 1e-2, "weight_decay": 1e-2}),
    ("adamsrt", {"lr": 1e-2}),
    ("sgdg", {"lr": 0.2, "ortho": 0.0}),
    ("sgdg", {"lr": 0.2, "ortho": 0.1}),  # Cho & Lee's penalty: one call per penalised tensor
    ("adamg", {"lr": 0.05, "ortho": 0.1, "betas": (0.3, 0.99)}),  # lerp from the start
]
GROUPINGS = ["channel", "groups:2", "tensor", "groups:2[0:8]"]
SHAPES = [(10, 3, 2, 2), (12, 5), (10, 1)]  # (a part [0:8] of every one: a rest)
STEPS = 3


def covered():
    return sorted(n for n in psiopt.list_optimizers() if getattr(psiopt.REGISTRY[n].cls, "fused_rule", False))


def test_every_rule_with_a_fused_kernel_is_covered():
    assert sorted({n for n, _ in CASES}) == covered()


#: the alignment hints (``tl.multiple_of``) the interpreted kernels gave, each checked true
HINTS: list = []


def _checked_hints(monkeypatch) -> None:
    """Triton's interpreter ignores ``tl.multiple_of`` (the compiler loads 16 bytes at a time on
    its word, and a wrong one would fault only on a GPU): here each hint is checked against the
    values it is said of (addresses, row lengths) and recorded in :data:`HINTS`."""
    from triton.runtime import interpreter

    real = interpreter.TensorHandle.set_attr

    def checked(self, key, value):
        if key == "tt.divisibility":
            assert (self.data % value[0] == 0).all(), (self.data, value)
            HINTS.append(value[0])
        real(self, key, value)

    HINTS.clear()
    monkeypatch.setattr(interpreter.TensorHandle, "set_attr", checked)


@pytest.fixture
def interpreted(monkeypatch):
    """The Triton kernels on CPU tensors, interpreted; counts their launches; checks the
    alignment hints the kernels give (:func:`_checked_hints`)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", True)
    _checked_hints(monkeypatch)
    calls = []
    launch = triton_rows._launch

    def counted(kernel, ws, *args):
        calls.append((kernel, len(ws)))
        return launch(kernel, ws, *args)

    monkeypatch.setattr(triton_rows, "_launch", counted)
    monkeypatch.setattr(kernels, "_call", lambda *a: pytest.fail("the C kernels ran"))
    return calls


@pytest.fixture
def launches(interpreted, monkeypatch):
    """The Triton launches themselves: (form, number of programs) of each."""
    out = []
    kernel = triton_rows._kernel

    class Counted:
        def __init__(self, fn, form):
            self.fn, self.form = fn, form

        def __getitem__(self, grid):
            out.append((self.form, grid[0]))
            return self.fn[grid]

    monkeypatch.setattr(triton_rows, "_kernel",
                        lambda name, dtype, form="rows": Counted(kernel(name, dtype, form), form))
    return out


#: rows longer than a block: the split form (with SHAPES, rows of 120, 60 and 48 entries over 8, 4
#: and 3 chunks, and of 30 and 20 over 2; a short row beside them in every group)
SPLIT = 16
#: the launches of rows longer than a block: per chunk, per row, per chunk
SPLIT_FORMS = {"rows", "partials", "reduce", "update"}


def run(name, settings, grouping, dtype, steps=STEPS, device="cpu", shapes=SHAPES, **kw):
    """``steps`` steps of fixed gradients on tensors of ``shapes`` in one group (drawn on the
    CPU, then moved to ``device``: tests/test_cuda.py runs the same on a GPU)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
              for s in shapes]
    grads = [[0.1 * torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)
              for s in shapes] for _ in range(steps)]
    group = {"params": params, "grouping": grouping, "norm_stats": [[] for _ in params]}
    opt = psiopt.REGISTRY[name].cls([group], **settings, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


def max_error(a, b):
    (pa, oa), (pb, ob) = a, b
    errors = [(x - y).abs().max().item() for x, y in zip(pa, pb)]
    for x, y in zip(pa, pb):
        for key, value in oa.state[x].items():
            if isinstance(value, torch.Tensor) and value.dim():
                errors.append((value - ob.state[y][key]).abs().max().item())
    return max(errors)


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("name, settings", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_triton_steps_agree_with_the_reference_path_in_float64(name, settings, grouping, launches,
                                                              monkeypatch):
    split = grouping != "channel"
    if split:  # rows longer than a block: one program per chunk, partial sums then the update
        monkeypatch.setattr(triton_rows, "MAX_BLOCK", SPLIT)
        monkeypatch.setattr(triton_rows, "MAX_PARTS", 2)  # (their sums 2 chunks at a time)
    fused = run(name, settings, grouping, torch.float64, fused=True)
    assert {form for form, _ in launches} == (SPLIT_FORMS if split else {"rows"})
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", False)
    reference = run(name, settings, grouping, torch.float64, foreach=False)
    assert max_error(fused, reference) < 1e-12


@pytest.mark.parametrize("split", [False, True], ids=["rows", "split"])
@pytest.mark.parametrize("name, settings", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_triton_steps_agree_with_the_reference_path_in_float32(name, settings, split, launches,
                                                              monkeypatch):
    if split:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK", SPLIT)
    fused = run(name, settings, "groups:2", torch.float32, fused=True)
    assert {form for form, _ in launches} == (SPLIT_FORMS if split else {"rows"})
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", False)
    reference = run(name, settings, "groups:2", torch.float32, foreach=False)
    truth = run(name, settings, "groups:2", torch.float64, foreach=False)
    # within 4x the reference path's own float32 error (and 1e-5 absolute)
    assert max_error(fused, truth) <= 4 * max_error(reference, truth) + 1e-5


@pytest.mark.parametrize("dtype, slack", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name, settings", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_triton_steps_of_16_bit_parameters_stay_within_the_reference_paths_error(
        name, settings, dtype, slack, launches, monkeypatch):
    """float16/bfloat16 parameters (per-entry arithmetic and a row's sums in float32, per-row
    state in float32): within 4x the reference path's own error against float64 (and the
    slack), rows split into chunks beside short rows (every kernel form).  Adam's eps is 1e-4
    in float16 (1e-8 is refused there: it is 0 in float16)."""
    monkeypatch.setattr(triton_rows, "MAX_BLOCK", SPLIT)
    if dtype == torch.float16 and name in ("adams", "adamsrt", "adamg"):
        settings = dict(settings, eps=1e-4)
    fused = run(name, settings, "groups:2", dtype, fused=True)
    assert {form for form, _ in launches} == SPLIT_FORMS
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", False)
    reference = run(name, settings, "groups:2", dtype, foreach=False)
    truth = run(name, settings, "groups:2", torch.float64, foreach=False)
    assert max_error(fused, truth) <= 4 * max_error(reference, truth) + slack


def test_one_launch_per_group_and_step_whatever_the_number_of_tensors(launches, interpreted):
    run("psi-sgdm", {"lr": 0.1, "momentum": 0.9}, "channel", torch.float64, fused=True)
    assert interpreted == [("psi", len(SHAPES))] * STEPS
    assert launches == [("rows", 10 + 12 + 10)] * STEPS  # one program per row


def test_at_most_four_launches_per_group_and_step_with_long_rows(launches, interpreted, monkeypatch):
    """Rows longer than ``MAX_BLOCK``: a launch of one program per chunk (8 + 4 for the rows of
    120 and 60 entries), one per row (their sums), one per chunk again; the short row's (10
    entries) in the first launch."""
    monkeypatch.setattr(triton_rows, "MAX_BLOCK", SPLIT)
    run("psi-sgdm", {"lr": 0.1, "momentum": 0.9}, "tensor", torch.float64, fused=True)
    assert interpreted == [("psi", len(SHAPES))] * STEPS
    assert launches == [("rows", 1), ("partials", 12), ("reduce", 2), ("update", 12)] * STEPS
    launches.clear()
    monkeypatch.setattr(triton_rows, "MAX_BLOCK", 4)  # every row long: three launches (no short rows)
    run("adams", {"lr": 1e-2}, "groups:2", torch.float64, fused=True)
    assert launches == [("partials", 2 * 15 + 2 * 8 + 2 * 2), ("reduce", 6), ("update", 50)] * STEPS


# a rule whose pre changes the buffer only for a nonzero hyperparameter (h[1]): the split form
# must not decide from one evaluation whether the buffer changes (a review found it did)
def _some_momentum_pre(w, g, b, h, k, HAS_B, OPT):
    return where(h[1] != 0, h[1] * b + g, b), (w * w, w * b)


def _some_momentum_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    return (-h[0] * safe_inv(sqrt(s[0])),), s1, s2


def _some_momentum_post(w, g, b, c, h, HAS_B, OPT):
    return w + c[0] * b, b


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_split_form_takes_the_buffer_as_the_definition_does(interpreted, monkeypatch, momentum):
    rule = rowrules.RowRule(_some_momentum_pre, _some_momentum_coef, _some_momentum_post)
    monkeypatch.setitem(rowrules.RULES, "some_momentum", rule)
    monkeypatch.setattr(triton_rows, "MAX_BLOCK", SPLIT)
    gen = torch.Generator().manual_seed(0)
    make = lambda: [torch.randn(3, 40, dtype=torch.float64, generator=gen) for _ in range(3)]  # noqa: E731
    for name, kw, h in (("some_momentum", {"b": True}, (0.1, momentum)),  # a buffer it may change
                        ("sgdmrt", {}, (0.1, 0.9, 0.01))):  # pre makes a buffer though there is none
        ws, gs, bs = make()[0:1], make()[0:1], make()[0:1]
        twin = [[x.clone() for x in xs] for xs in (ws, gs, bs)]
        extra = {"b": bs} if kw else {}
        assert triton_rows.run(name, ws, gs, h=h, **extra)
        rowrules.evaluate(name, twin[0], twin[1], h=h, **({"b": twin[2]} if kw else {}))
        torch.testing.assert_close(ws[0], twin[0][0], rtol=1e-12, atol=1e-14)
        if kw:
            torch.testing.assert_close(bs[0], twin[2][0], rtol=1e-12, atol=1e-14)


def test_the_chunks_of_a_row_are_mapped_in_order():
    table = triton_rows._row_map([2, 3, 1], [5, 3, 9], 4)  # rows of 5 and 9 entries: 2 and 3 chunks
    assert table[:3, :3].tolist() == [[1, 1, 1], [0, 1, 2], [0, 0, 0]]  # the short rows
    assert table[:3, 3:].tolist() == [[0, 0, 0, 0, 2, 2, 2], [0, 0, 1, 1, 0, 0, 0],
                                      [0, 1, 0, 1, 0, 1, 2]]
    assert table[3, :3].tolist() == [5, 3, 9]


@pytest.mark.parametrize("name, settings", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_the_rule_definitions_run_with_torch_as_the_reference_path_steps(name, settings, monkeypatch):
    """``rowrules.evaluate``: the same definitions, every row at once in torch (no Triton)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (what selecting the Triton path on CPU asks)
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", True)
    def launch(kernel, ws, gs, b, s1, s2, k, h, opt):
        rowrules.evaluate(kernel, ws, gs, b=b or None, s1=s1 or None, s2=s2 or None,
                          k=None if k is None else k.tolist(), h=h.tolist())

    monkeypatch.setattr(triton_rows, "_launch", launch)
    fused = run(name, settings, "groups:2[0:8]", torch.float64, fused=True)
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", False)
    assert max_error(fused, run(name, settings, "groups:2[0:8]", torch.float64, foreach=False)) < 1e-12


@pytest.mark.parametrize("grouping", ["channel", "tensor"])
def test_a_compiled_step_calls_the_op(grouping, launches, interpreted, monkeypatch):
    monkeypatch.setattr(triton_rows, "MAX_BLOCK", SPLIT)  # (tensor: rows split into chunks)
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opts = [psiopt.REGISTRY["un-sgd"].cls([{"params": x, "grouping": grouping,
                                            "norm_stats": [[] for _ in x]}], lr=0.05) for x in (ps, qs)]
    compiled = torch.compile(opts[0].step, backend="aot_eager", fullgraph=True)
    for step in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        compiled() if step else opts[0].step()  # the first step makes the state
        opts[1].step()
    assert len(interpreted) == 6  # eager and compiled, one call per step each
    assert len(launches) == 6 * (1 if grouping == "channel" else 4)  # (short rows, then split)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_cpu_steps_need_no_triton():
    """With triton not importable (blocked in a fresh process), CPU steps take the C kernels."""
    code = ("import sys; sys.modules['triton'] = None\n"  # import triton raises ImportError
            "import torch, psiopt\n"
            "from psiopt.optim import kernels, triton_rows\n"
            "p = torch.randn(4, 3, requires_grad=True)\n"
            "o = psiopt.REGISTRY['un-sgd'].cls([{'params': [p], 'grouping': 'channel', "
            "'norm_stats': [[]]}], lr=0.1, fused=True)\n"
            "p.grad = torch.randn(4, 3); o.step()\n"
            "assert not triton_rows.importable() and kernels.backend(p) == 'c'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PSIOPT_TRITON_CPU", "TRITON_INTERPRET")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_cuda_tensors_would_take_triton():
    assert kernels.backend(torch.empty(2, 2, device="meta")) is None
    assert triton_rows.importable()


def _registers(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes)`` of a cubin's kernel, from the CUDA toolkit's ``cuobjdump``
    that Triton's wheel carries (no GPU needed)."""
    import re
    import tempfile

    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    assert found, out
    return int(found[1]), int(found[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_kernel_compiles_for_a_gpu(dtype, monkeypatch):
    """Triton's compiler (not its interpreter) on every rule's kernel, with the options the
    launches take (``launch_options``), to an sm_90 cubin: no GPU is needed to compile.  The
    four kernels at the largest block (``MAX_BLOCK``), each with its two bodies (a row on
    16-byte boundaries loaded 16 bytes at a time, ``VEC``; others 4), the one-program kernel at
    256 entries with ``VEC`` 1 too: no spill, i.e. the stack holds at most the 40 bytes of
    libdevice's sin/cos argument reduction (SGDG/AdamG's rule), but for two of SGDG/AdamG's
    kernels with sixteen warps (128 registers a thread): float64 rows of 4096 entries, 96
    bytes (56 with one body: two doubles spilled), and the bfloat16 chunks' update, 80 bytes
    (ptxas gives it 64 registers).  With Triton's default four warps PSI-SGD's kernel took 255
    registers and spilled 48 bytes at 4096 entries."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    try:
        from triton.backends.compiler import GPUTarget
        target = GPUTarget("cuda", 90, 32)
    except ImportError:
        pytest.skip("this triton has no GPUTarget")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tables = dict(PTR="*i64", ROW_T="*i64", ROW_I="*i64", COLS="*i64", K="*fp64", H="*fp64")
    chunks = dict(PTR="*i64", CH_T="*i64", CH_I="*i64", CH_J="*i64", COLS="*i64", K="*fp64",
                  H="*fp64", SCR="*fp64")
    wide = tl.float64 if dtype == torch.float64 else tl.float32
    block = triton_rows.MAX_BLOCK
    for name, rule in rowrules.RULES.items():
        flags = dict(HAS_B=True, HAS_S1=True, HAS_S2=True, OPT=True,
                     T=triton_rows._triton_dtype(dtype), S1T=wide, S2T=wide, ACC=wide,
                     VEC=16 // dtype.itemsize)
        writes_w, writes_b = rowrules.stores(name, True, True)
        writes = dict(WRITES_W=writes_w, WRITES_B=writes_b, WRITES_S1=rule.writes_s1,
                      WRITES_S2=rule.writes_s2)
        nsum = triton_rows._nsum(name, True, True)
        forms = {"rows": (tables, dict(BLOCK=block, **writes, **flags)),
                 "rows at 256": (tables, dict(BLOCK=256, **writes, **dict(flags, VEC=1))),
                 "partials": (chunks, dict(BLOCK=block, NSUM=nsum, **flags)),
                 "reduce": (dict(SCR="*fp64", FIRST="*i64", COUNT="*i64"),
                            dict(NSUM=nsum, PARTS=triton_rows.MAX_PARTS)),
                 "update": (chunks, dict(BLOCK=block, NSUM=nsum, **writes, **flags))}
        for form, (pointers, constants) in forms.items():
            nt = {} if form == "reduce" else {"NT": "i32"}
            signature = dict(pointers, **nt, **{k: "constexpr" for k in constants})
            source = triton.compiler.ASTSource(triton_rows._kernel(name, dtype, form.split()[0]),
                                               signature, constants)
            options = triton_rows.launch_options(constants.get("BLOCK", constants.get("PARTS")))
            registers, stack = _registers(triton.compile(source, target=target,
                                                         options=options).asm["cubin"])
            trig = {(torch.float64, "rows"): 96, (torch.bfloat16, "update"): 80}.get(
                (dtype, form), 40) if name == "sphere" else 0
            assert stack <= trig, (name, form, registers, stack)


def test_a_kernel_stores_only_what_its_step_changes(monkeypatch):
    """``rowrules.stores``, from the rules' definitions: "project" does not write ``w``, "rotate"
    and "retract" do not write the buffer they read, and a buffer that a hyperparameter may
    change (``where(h[1] != 0, ...)``, decided on the device) is written.  In the compiled kernels
    (sm_90 PTX, no GPU needed) those stores are gone: fewer ``st.global`` than with every store
    kept, and as many where the step changes both."""
    triton = pytest.importorskip("triton")
    import re

    import triton.language as tl

    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        pytest.skip("this triton has no GPUTarget")
    monkeypatch.setitem(rowrules.RULES, "some_momentum", rowrules.RowRule(
        _some_momentum_pre, _some_momentum_coef, _some_momentum_post))
    assert rowrules.stores("some_momentum", True, False) == (True, True)
    assert rowrules.stores("project", True, False) == (False, True)
    assert rowrules.stores("rotate", True, False) == rowrules.stores("retract", True, False) \
        == (True, False)
    assert rowrules.stores("psi", True, False) == (True, True)
    assert rowrules.stores("psi", False, False) == (True, False)  # (no buffer: none written)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tables = dict(PTR="*i64", ROW_T="*i64", ROW_I="*i64", COLS="*i64", K="*fp64", H="*fp64")

    def st_global(name, writes_w, writes_b):
        rule = rowrules.RULES[name]
        constants = dict(BLOCK=256, HAS_B=True, HAS_S1=True, HAS_S2=True, OPT=False,
                         T=tl.float32, S1T=tl.float32, S2T=tl.float32, ACC=tl.float32, VEC=1,
                         WRITES_W=writes_w, WRITES_B=writes_b, WRITES_S1=rule.writes_s1,
                         WRITES_S2=rule.writes_s2)
        signature = dict(tables, NT="i32", **{k: "constexpr" for k in constants})
        source = triton.compiler.ASTSource(triton_rows._kernel(name, torch.float32, "rows"),
                                           signature, constants)
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                             options=triton_rows.launch_options(256)).asm["ptx"]
        return len(re.findall(r"\bst\.global", ptx))

    for name in ("project", "rotate", "retract", "psi"):
        derived = st_global(name, *rowrules.stores(name, True, False))
        every = st_global(name, True, True)
        assert (derived < every) == (rowrules.stores(name, True, False) != (True, True)), name


def test_rows_on_16_byte_boundaries_are_loaded_16_bytes_at_a_time(interpreted, monkeypatch):
    """Each program finds whether its row lies on 16-byte boundaries (``_aligned``: the tensors'
    addresses and the row length), as torch's multi-tensor apply does, and takes the body the
    compiler was told so of (``VEC``: 16-byte loads and stores in sm_90 PTX), else the one
    that loads 4 bytes at a time.  Interpreted, groups of aligned rows, rows of 27 entries and
    weights, gradients or buffers 8 bytes into their storage (float64, bfloat16) step as the
    rules' definitions do, and the hints given (checked by the ``interpreted`` fixture:
    Triton's interpreter ignores them, and a wrong one would fault only on a GPU) are the
    aligned rows' alone."""
    triton = pytest.importorskip("triton")
    import re

    import triton.language as tl

    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        pytest.skip("this triton has no GPUTarget")
    gen = torch.Generator().manual_seed(0)

    def tensor(dtype, rows, cols, skew=0):  # ``skew`` entries into its storage
        return torch.randn(rows * cols + skew, generator=gen, dtype=torch.float64) \
            .to(dtype)[skew:].view(rows, cols)

    def step(dtype, shapes, b=False):
        """PSGD (with a buffer: momentum) on tensors of ``shapes`` ((rows, cols, skew of w, of
        g, of b)), interpreted, against rowrules.evaluate; the hints given."""
        HINTS.clear()
        ws, gs, bs = ([tensor(dtype, r, c, sk[j]) for r, c, *sk in shapes] for j in range(3))
        twin = [[x.clone() for x in xs] for xs in (ws, gs, bs)]
        extra = dict(k=[[0.9, 0.0]] * len(ws)) if b else {}
        assert triton_rows.run("psgd", ws, gs, h=(0.1,), **extra, **({"b": bs} if b else {}))
        rowrules.evaluate("psgd", twin[0], twin[1], h=(0.1,), **extra,
                          **({"b": twin[2]} if b else {}))
        for w, t in zip(ws, twin[0]):
            torch.testing.assert_close(w, t, rtol=1e-12 if dtype == torch.float64 else 1e-2,
                                       atol=1e-14 if dtype == torch.float64 else 1e-2)
        return set(HINTS)

    f64 = torch.float64
    # rows of 72 float64 (576 bytes), of 27 (216: not aligned), 8 bytes into w's storage
    assert step(f64, [(16, 72, 0, 0, 0), (16, 27, 0, 0, 0), (16, 4, 1, 0, 0)]) == {16, 2}
    assert step(f64, [(16, 27, 0, 0, 0), (16, 4, 1, 0, 0)]) == set()  # none aligned, none said
    assert step(f64, [(16, 4, 0, 1, 0)]) == set()  # the gradient 8 bytes in
    assert step(f64, [(16, 4, 0, 0, 1)], b=True) == set()  # the buffer 8 bytes in
    assert step(f64, [(16, 4, 0, 0, 0)], b=True) == {16, 2}
    bf16 = torch.bfloat16  # 8 entries: 16 bytes
    assert step(bf16, [(4, 24, 0, 0, 0)], b=True) == {16, 8}
    assert step(bf16, [(4, 24, 0, 0, 4)], b=True) == set()  # the buffer 8 bytes in
    assert step(bf16, [(4, 20, 0, 0, 0)]) == set()  # rows of 40 bytes
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tables = dict(PTR="*i64", ROW_T="*i64", ROW_I="*i64", COLS="*i64", K="*fp64", H="*fp64")
    constants = dict(BLOCK=256, HAS_B=True, HAS_S1=False, HAS_S2=False, OPT=False,
                     T=tl.float32, S1T=tl.float32, S2T=tl.float32, ACC=tl.float32, VEC=4,
                     WRITES_W=True, WRITES_B=True, WRITES_S1=False, WRITES_S2=False)
    signature = dict(tables, NT="i32", **{k: "constexpr" for k in constants})
    source = triton.compiler.ASTSource(triton_rows._kernel("psi", torch.float32, "rows"),
                                       signature, constants)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                         options=triton_rows.launch_options(256)).asm["ptx"]
    assert set(re.findall(r"st\.global(?:\.v\d)?\.b32", ptx)) == {"st.global.b32",
                                                                   "st.global.v4.b32"}


class _Sm90:
    """A Triton driver that reports one sm_90 GPU: enough for Triton's JIT to bind a launch's
    arguments and compile it (no launch: see test_the_jit_binds_and_compiles_every_launch)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_jit_binds_and_compiles_every_launch(dtype, monkeypatch):
    """The launches of a step as Triton's JIT takes them on a GPU, not its interpreter: each
    launch of ``_launch`` (rows in registers, and split rows: four kernels) goes through the
    JIT's binder with its arguments and options and is compiled to an sm_90 cubin, on a driver
    that reports that GPU, as a warm-up (compiled, not launched).  The binder reads which
    parameters are ``tl.constexpr`` from the kernels' annotations: the rule definitions'
    rebinding once dropped them, and every launch raised "failed to specialize argument of
    type: dtype" (the interpreter and ASTSource compiles, which name the constexprs themselves,
    did not see it)."""
    pytest.importorskip("triton")
    from triton.runtime.driver import driver

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_rows, "MAX_BLOCK", 256)  # (small split rows: quick compiles)
    compiled = []
    build = triton_rows._kernel

    class Warmup:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def warm(*args, **kwargs):
                compiled.append(self.fn.run(*args, grid=grid, warmup=True, **kwargs))
            return warm

    monkeypatch.setattr(triton_rows, "_kernel", lambda *a: Warmup(build(*a)))
    monkeypatch.setattr(driver, "_active", _Sm90())
    torch.manual_seed(0)
    ws = [torch.randn(3, 20, dtype=dtype), torch.randn(2, 300, dtype=dtype)]  # short, split rows
    for name, b, s1, s2, h in [
            ("psi", True, False, False, (0.1, 0.9, 1e-4)),
            ("adams", True, True, False, (0.9, 0.999, 0.0, 1e-8, 1.0)),
            ("sphere", True, True, True, (0.9, -0.1, 0.1, 0.99, 1e-8))]:
        state = lambda shape, yes: [torch.zeros(shape(w), dtype=w.dtype) for w in ws] if yes else []  # noqa: E731
        args = (ws, [torch.randn_like(w) for w in ws], state(lambda w: w.shape, b),
                state(lambda w: (w.shape[0], 1), s1), state(lambda w: (w.shape[0], 1), s2))
        compiled.clear()
        triton_rows._launch(name, *args, None, rowrules.hyper_tensor(h, "cpu"),
                            rowrules.option(name, h))
        assert len(compiled) == 4 and all("cubin" in k.asm for k in compiled), name


def test_a_16_bit_parameters_float32_state_is_inverted_down_to_float32s_floor(interpreted, monkeypatch):
    # AdamG*'s r4 is float32 state for a float16 weight: 1/√r4 must not stop at float16's
    # smallest normal number (6e-5), as the reference path's does not
    w0 = torch.nn.functional.normalize(torch.randn(3, 8, dtype=torch.float64,
                                                   generator=torch.Generator().manual_seed(0)), dim=1).half()
    g0 = (1e-3 * torch.randn(3, 8, generator=torch.Generator().manual_seed(1))).half()
    out = {}
    for path, kw in (("triton", {"fused": True}), ("reference", {"foreach": False})):
        monkeypatch.setattr(kernels, "TRITON_ON_CPU", path == "triton")
        p = torch.nn.Parameter(w0.clone())
        opt = psiopt.AdamGStar([{"params": [p], "grouping": "channel", "norm_stats": [[]]}], lr=0.1, **kw)
        p.grad = torch.zeros_like(p)
        opt.step()  # (state made)
        opt.state[p]["r4"].copy_(torch.tensor([[1e-12], [1e-8], [1.0]]))  # √r4: 1e-6, 1e-4, 1
        p.grad = g0.clone()
        opt.step()
        out[path] = p.detach().float()
    assert (out["triton"] - out["reference"]).abs().max() < 1e-2  # (0.22 with float16's floor)


def test_per_row_state_of_mixed_dtypes_is_not_taken():
    ws = [torch.zeros(3, 4), torch.zeros(3, 4)]
    assert triton_rows.state_fits(ws, s1=[torch.zeros(3, 1), torch.zeros(3, 1)])
    assert not triton_rows.state_fits(ws, s1=[torch.zeros(3, 1), torch.zeros(3, 1, dtype=torch.float64)])
