"""The C kernels' rules, generated from their one definition in :mod:`psiopt.optim.rowrules`.

``kernels.c`` holds what every rule shares (the row loop, the threads, the chunked sums); each
rule's ``pre``, ``coef`` and ``post`` (:class:`~psiopt.optim.rowrules.RowRule`) are written here
in C by running the rule's Python functions on symbolic values that record each operation
(:class:`_Expr`), with the helpers (``sqrt``, ``safe_inv``, ``where``…) rebound as
:mod:`psiopt.optim.triton_rows` rebinds them for Triton.  Nothing here restates a rule.

What the generated code computes, as :func:`psiopt.optim.rowrules.evaluate` does with torch:

* a value that depends on the row's entries is computed in ``REAL`` (the tensor's precision,
  as torch's per-entry arithmetic), ``wide`` values in double; a value that does not
  (hyperparameters, per-tensor scalars, coefficients, and arithmetic on them) is a double,
  computed once before the loop over entries and cast to ``REAL`` where it meets an entry, as a
  Python number meets a tensor in torch;
* the sums of ``pre``'s terms are taken in the term's type over chunks of a row (``kernels.c``);
  the coefficients are doubles;
* a rule's static choices (``HAS_B``, ``HAS_S1``, ``HAS_S2``, ``OPT``) give one C function per
  combination, and each rule's entry point picks the combination of its arguments.

:func:`source` returns the C text (compiled by :mod:`psiopt.optim.kernels` after ``kernels.c``).
"""

from __future__ import annotations

import functools
import re

from . import rowrules


class _Expr:
    """A value of the generated C code: ``text`` (a C expression, often a local's name),
    ``entry`` (whether it depends on the row's entries) and ``ctype`` (``"REAL"`` or
    ``"double"``; uniform values are doubles)."""

    __slots__ = ("gen", "text", "entry", "ctype")

    def __init__(self, gen: _Gen, text: str, entry: bool, ctype: str):
        self.gen, self.text, self.entry, self.ctype = gen, text, entry, ctype

    def __bool__(self):
        raise TypeError("a rule tested a value that is known only when the kernel runs "
                        "(use where(), not if)")

    def _bin(self, other, op, swap=False):
        a, b = (other, self) if swap else (self, other)
        return self.gen.binary(a, b, op)

    __add__ = lambda s, o: s._bin(o, "+")  # noqa: E731
    __radd__ = lambda s, o: s._bin(o, "+", True)  # noqa: E731
    __sub__ = lambda s, o: s._bin(o, "-")  # noqa: E731
    __rsub__ = lambda s, o: s._bin(o, "-", True)  # noqa: E731
    __mul__ = lambda s, o: s._bin(o, "*")  # noqa: E731
    __rmul__ = lambda s, o: s._bin(o, "*", True)  # noqa: E731
    __truediv__ = lambda s, o: s._bin(o, "/")  # noqa: E731
    __rtruediv__ = lambda s, o: s._bin(o, "/", True)  # noqa: E731
    __lt__ = lambda s, o: s._bin(o, "<")  # noqa: E731
    __gt__ = lambda s, o: s._bin(o, ">")  # noqa: E731
    __le__ = lambda s, o: s._bin(o, "<=")  # noqa: E731
    __ge__ = lambda s, o: s._bin(o, ">=")  # noqa: E731
    __eq__ = lambda s, o: s._bin(o, "==")  # noqa: E731
    __ne__ = lambda s, o: s._bin(o, "!=")  # noqa: E731
    __hash__ = None

    def __neg__(self):
        return self.gen.node(f"-{self.text}", self.entry, self.ctype)

    def __abs__(self):
        return self.gen.call("fabs", self)


class _Branch(Exception):
    """Tracing met ``cond``, a condition decided once for the row (``uniform``: the statements
    that compute it)."""

    def __init__(self, cond: str, uniform: list[str]):
        super().__init__(cond)
        self.cond, self.uniform = cond, uniform


def _literal(x) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"a rule used {x!r} as a number")
    text = repr(float(x))
    if not re.fullmatch(r"-?[0-9.e+-]+", text):
        raise ValueError(f"no C literal for {x!r}")
    return text


class _Gen:
    """The statements of one generated function: those computed once (``uniform``) and those of
    the loop over a row's entries (``body``)."""

    def __init__(self, assume: dict | None = None):
        self.assume = assume or {}  # conditions taken as decided (see where)
        self.uniform: list[str] = []
        self.body: list[str] = []
        self.count = 0

    def leaf(self, text: str, entry: bool = False, ctype: str = "double") -> _Expr:
        return _Expr(self, text, entry, ctype)

    def node(self, text: str, entry: bool, ctype: str, condition: bool = False) -> _Expr:
        """A new local holding ``text`` (a condition stays an inline expression)."""
        if condition:
            return _Expr(self, f"({text})", entry, "int")
        name = f"e{self.count}"
        self.count += 1
        (self.body if entry else self.uniform).append(f"const {ctype} {name} = {text};")
        return _Expr(self, name, entry, ctype)

    def operand(self, x, ctype: str) -> str:
        """``x`` (an expression or a Python number) as an operand of type ``ctype``."""
        if not isinstance(x, _Expr):
            return f"(REAL){_literal(x)}" if ctype == "REAL" else _literal(x)
        if ctype == "REAL" and not x.entry:
            return f"(REAL){x.text}"
        return x.text

    def result(self, *xs) -> tuple[bool, str]:
        """Whether a value made from ``xs`` depends on the entries, and its type: ``REAL`` if it
        does and none of them is a ``wide`` double, else double (C's promotion, as torch's)."""
        es = [x for x in xs if isinstance(x, _Expr) and x.entry and x.ctype != "int"]
        entry = any(isinstance(x, _Expr) and x.entry for x in xs)
        return entry, ("double" if not es or any(x.ctype == "double" for x in es) else "REAL") \
            if entry else "double"

    def binary(self, a, b, op: str) -> _Expr:
        entry, ctype = self.result(a, b)
        text = f"{self.operand(a, ctype)} {op} {self.operand(b, ctype)}"
        return self.node(text, entry, ctype, condition=op in ("<", ">", "<=", ">=", "==", "!="))

    def call(self, fn: str, x) -> _Expr:
        if x.entry:
            raise TypeError(f"{fn}() of a row's entry: the rules take it of sums and coefficients")
        return self.node(f"{fn}({x.text})", False, "double")

    def where(self, cond, a, b):
        if isinstance(cond, bool):  # a static choice
            return a if cond else b
        if not cond.entry and any(isinstance(x, _Expr) and x.entry for x in (a, b)):
            # a choice made once for the row between values of its entries: a selection in the
            # loop stops GCC vectorizing it, so each choice is a loop of its own (_entrywise)
            if cond.text not in self.assume:
                raise _Branch(cond.text, list(self.uniform))
            return a if self.assume[cond.text] else b
        entry, ctype = self.result(cond, a, b)
        return self.node(f"{cond.text} ? {self.operand(a, ctype)} : {self.operand(b, ctype)}",
                         entry, ctype)


def _helpers(gen: _Gen) -> dict:
    """rowrules' helpers as functions of :class:`_Expr` (Python numbers stay numbers)."""
    import math

    def unary(fn, py):
        return lambda x: gen.call(fn, x) if isinstance(x, _Expr) else py(x)

    def safe_inv(x):
        return gen.call("safe_inv", x) if isinstance(x, _Expr) else rowrules.safe_inv(x)

    def wide(x):
        return gen.node(f"(double){x.text}", True, "double") if x.entry else x

    scope = {"sqrt": unary("sqrt", math.sqrt), "cos": unary("cos", math.cos),
             "sin": unary("sin", math.sin), "fabs": unary("fabs", abs), "where": gen.where,
             "wide": wide, "safe_inv": safe_inv}
    scope["sqnorm_of_sum"] = rowrules.rebind(rowrules.sqnorm_of_sum, scope)
    return scope


#: the most sums and coefficients a rule takes (``NSUM``, ``NCOEF`` of ``kernels.c``)
NSUM, NCOEF = 6, 8


def _uses(lines: list[str], name: str) -> bool:
    return any(re.search(rf"\b{name}\b", line) for line in lines)


def _live(statements: list[str], used: list[str]) -> list[str]:
    """``statements`` (``const T eN = …;``) less those whose value nothing in ``used`` (or a
    statement kept) reads: a rule's values that this combination of choices does not need."""
    kept, needed = [], " ".join(used)
    for line in reversed(statements):
        name = line.split(" = ", 1)[0].split()[-1]
        if re.search(rf"\b{name}\b", needed):
            kept.append(line)
            needed += " " + line
    return kept[::-1]


def _prologue(lines: list[str]) -> list[str]:
    """Declarations of the hyperparameters, per-tensor scalars and coefficients ``lines`` use."""
    out = [f"const double h{j} = a->h[{j}];" for j in range(6) if _uses(lines, f"h{j}")]
    ks = [j for j in range(2) if _uses(lines, f"k{j}")]
    out += [f"const double k{j} = a->k[t * a->kstride + {j}];" for j in ks]
    out += [f"const double c{j} = c[{j}];" for j in range(NCOEF) if _uses(lines, f"c{j}")]
    return out


def _entrywise(name: str, fn, has_b: bool, opt: bool, sums: bool) -> str:
    """C for ``pre`` (``sums``) or ``post`` over entries ``[lo, hi)`` of row ``r``: a loop, or
    where the rule chooses between values of the entries by a condition decided once for the
    row (``where(h[2] != 0, g + h[2] w, g)``), a loop for each outcome and a function ``name``
    that picks one."""
    versions: list[str] = []
    args = "a, t, r, lo, hi, s" if sums else "a, t, r, lo, hi, c"

    def pick(assume: dict) -> list[str]:
        try:
            versions.append(_loop(f"{name}_{len(versions)}", fn, has_b, opt, sums, assume))
            return [f"{name}_{len(versions) - 1}({args});"]
        except _Branch as branch:
            test = [*_live(branch.uniform, [branch.cond]), f"if {branch.cond} {{"]
            inner = [*_prologue(test), *test, *pick({**assume, branch.cond: True}), "} else {",
                     *pick({**assume, branch.cond: False}), "}"]
            return ["{", *["  " + line for line in inner], "}"]

    calls = pick({})
    if len(versions) == 1:
        return versions[0].replace(f"{name}_0(", f"{name}(", 1)
    head = f"static void {name}(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, " \
        f"{'double *s' if sums else 'const double *c'}) "
    return "\n\n".join(versions) + "\n\n" + head + "\n".join(calls)


def _loop(name: str, fn, has_b: bool, opt: bool, sums: bool, assume: dict) -> str:
    """One loop of :func:`_entrywise`, with the conditions ``assume`` decided."""
    gen = _Gen(assume)
    scope = _helpers(gen)
    w, g = gen.leaf("w_", True, "REAL"), gen.leaf("g_", True, "REAL")
    b = gen.leaf("b_", True, "REAL") if has_b else w
    h = [gen.leaf(f"h{j}") for j in range(6)]
    k = [gen.leaf(f"k{j}") for j in range(2)]
    stores, acc = [], []
    if sums:
        nb, terms = rowrules.rebind(fn, scope)(w, g, b, h, k, has_b, opt)
        if has_b and nb is not b:
            stores.append(f"b[i] = {gen.operand(nb, 'REAL')};")
        for j, term in enumerate(terms):
            ctype = term.ctype if term.entry else "double"
            acc.append((f"s{j}", ctype, gen.operand(term, ctype)))
    else:
        c = [gen.leaf(f"c{j}") for j in range(NCOEF)]
        nw, nb = rowrules.rebind(fn, scope)(w, g, b, c, h, has_b, opt)
        if nw is not w:
            stores.append(f"w[i] = {gen.operand(nw, 'REAL')};")
        if has_b and nb is not b:
            stores.append(f"b[i] = {gen.operand(nb, 'REAL')};")
    tail = stores + [f"{n} += {x};" for n, _, x in acc]
    body = _live(gen.body, tail) + tail
    uniform = _live(gen.uniform, body)
    loads = [f"const REAL {x}_ = {x}[i];" for x in "wgb" if _uses(body, x + "_")]
    written = {x for x in "wb" if any(line.startswith(f"{x}[i] =") for line in stores)}
    pointers = [f"{'' if x in written else 'const '}REAL *{x} = SPAN(a->{x});"
                for x in "wgb" if _uses(body, x + "_") or x in written]
    lines = [f"static void {name}(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, "
             f"{'double *s' if sums else 'const double *c'}) {{", *pointers]
    lines += _prologue(uniform + body) + uniform
    lines += [f"{ctype} {n} = 0;" for n, ctype, _ in acc]
    reduction = f" reduction(+ : {', '.join(n for n, _, _ in acc)})" if acc else ""
    lines += [f"#pragma omp simd{reduction}", "for (int64_t i = lo; i < hi; i++) {",
              *["  " + line for line in loads + body], "}"]
    lines += [f"s[{j}] += {n};" for j, (n, _, _) in enumerate(acc)]
    return "\n  ".join(lines) + "\n}"


def _coef(name: str, rule: rowrules.RowRule, has_s1: bool, has_s2: bool, opt: bool) -> str:
    """C for ``coef``: the coefficients ``c`` of row ``r`` from its sums ``s``; writes the row's
    state."""
    gen = _Gen()
    s = [gen.leaf(f"s[{j}]") for j in range(NSUM)]
    s1 = gen.leaf("(double)a->s1[t][r]") if has_s1 else 0.0
    s2 = gen.leaf("(double)a->s2[t][r]") if has_s2 else 0.0
    h = [gen.leaf(f"h{j}") for j in range(6)]
    k = [gen.leaf(f"k{j}") for j in range(2)]
    c, n1, n2 = rowrules.rebind(rule.coef, _helpers(gen))(s, s1, s2, k, h, gen.leaf("(double)d"),
                                                  has_s1, has_s2, opt)
    out = [f"c[{j}] = {gen.operand(x, 'double')};" for j, x in enumerate(c)]
    if has_s1 and rule.writes_s1:
        out.append(f"a->s1[t][r] = (REAL)({gen.operand(n1, 'double')});")
    if has_s2 and rule.writes_s2:
        out.append(f"a->s2[t][r] = (REAL)({gen.operand(n2, 'double')});")
    uniform = _live(gen.uniform, out)
    lines = [f"static void {name}(const Args *a, int t, int64_t r, int64_t d, const double *s, "
             "double *c) {", *_prologue(uniform + out), *uniform, *out]
    return "\n  ".join(lines) + "\n}"


@functools.cache
def source() -> str:
    """The C text of every rule of :data:`psiopt.optim.rowrules.RULES`: its functions per
    combination of static choices, deduplicated, and its entry point ``<rule>_f32``/``_f64``
    (through ``NAME``), which picks them by the call's arguments."""
    functions: dict[str, str] = {}  # C text (named "@") -> name

    def add(prefix: str, text: str) -> str:
        return functions.setdefault(text, f"{prefix}_{len(functions)}")

    out = []
    for rule_name, rule in rowrules.RULES.items():
        table = []
        for v in range(16):  # the entry point's index of the combination
            has_b, has_s1, has_s2, opt = (bool(v & bit) for bit in (1, 2, 4, 8))
            if rule.option is None and opt:
                table.append(table[v - 8])
                continue
            pre_text = _entrywise("@", rule.pre, has_b, opt, sums=True)
            pre = add(f"{rule_name}_pre", pre_text)
            post = add(f"{rule_name}_post", _entrywise("@", rule.post, has_b, opt, sums=False))
            coef = add(f"{rule_name}_coef", _coef("@", rule, has_s1, has_s2, opt))
            # the row loop may take the next row's sums with this row's update (kernels.c)
            # where they read w alone
            alone = not re.search(r"\b(g_|b_|b\[i\] =)", pre_text)
            table.append(f"{{{pre}, {coef}, {post}, {int(alone)}}}")
        opt = f"(a->h[{rule.option}] != 0)" if rule.option is not None else "0"
        out.append(
            f"void NAME({rule_name})(int nt, const Args *a, int threads) {{\n"
            f"  static const Rule rules[16] = {{{', '.join(table)}}};\n"
            f"  const int v = (a->b != 0) | (a->s1 != 0) << 1 | (a->s2 != 0) << 2 | {opt} << 3;\n"
            f"  for_rows(nt, a, threads, &rules[v]);\n}}")
    defs = [text.replace("@", name) for text, name in functions.items()]
    return "\n\n".join(["/* generated by psiopt.optim.c_rows from psiopt.optim.rowrules */",
                        *defs, *out]) + "\n"
