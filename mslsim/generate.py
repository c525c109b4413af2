"""The source text MLX generates for ``mx.fast.metal_kernel``, ported byte for byte.

Port of ``write_signature``, ``write_template``, ``make_template_hash`` and the
kernel naming in ``metal_kernel`` (mlx/backend/common/metal_kernel.cpp, mlx
0.32.4). ``tests/test_mslsim.py`` checks it against the text MLX itself prints
with ``verbose=True`` while ``mx.export_function`` traces a call.

``to_cpp`` then turns that text into a C++ translation unit for the simulator.
"""

import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

# Inputs with fewer elements are passed in the constant address space.
MAX_CONSTANT_ARRAY_SIZE = 8

# (attribute, type) in MLX's fixed order; one is added to the signature when
# its name occurs anywhere in the source.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

# MLX's get_type_string (mlx/backend/common/compiled.cpp), keyed by dtype name.
TYPE_STRINGS = {
    "float32": "float",
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "float64": "double",
    "complex64": "complex64_t",
    "bool": "bool",
    "bool_": "bool",
    "int8": "int8_t",
    "int16": "int16_t",
    "int32": "int32_t",
    "int64": "int64_t",
    "uint8": "uint8_t",
    "uint16": "uint16_t",
    "uint32": "uint32_t",
    "uint64": "uint64_t",
}


def dtype_name(dtype) -> str:
    """'float32' for mx.float32, np.float32, np.dtype('float32') or 'float32'."""
    if isinstance(dtype, str):
        return dtype
    text = str(dtype)
    if text.startswith("mlx.core."):
        return text[len("mlx.core."):]
    return np.dtype(dtype).name


def type_string(dtype) -> str:
    name = dtype_name(dtype)
    if name not in TYPE_STRINGS:
        raise ValueError(f"[metal_kernel] Unsupported compilation type {name}")
    return TYPE_STRINGS[name]


@dataclass(frozen=True)
class InputInfo:
    """What the generated signature needs to know about one input array."""

    name: str
    type_string: str
    ndim: int
    size: int

    @property
    def is_constant(self) -> bool:
        return self.size < MAX_CONSTANT_ARRAY_SIZE


def shape_infos(source: str, input_names: Sequence[str]) -> List[Tuple[bool, bool, bool]]:
    """Whether `<name>_shape`, `_strides`, `_ndim` occur in the source (MLX's substring test)."""
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def attributes(source: str) -> List[str]:
    return [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in source]


def used_attributes(source: str) -> List[str]:
    return [a for a, _ in METAL_ATTRIBUTES if a in source]


def _template_value(value) -> str:
    if isinstance(value, (bool, np.bool_)):  # before int: bool is an int in Python
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return type_string(value)


def _template_param_type(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    return "typename"


def write_template(template: Sequence[Tuple[str, object]]) -> str:
    return "<" + ", ".join(_template_value(v) for _, v in template) + ">"


def make_template_hash(template_def: str) -> str:
    out, i = [], 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


def kernel_name(name: str, template, inputs: Sequence[InputInfo], output_types: Sequence[str]) -> str:
    kname = "custom_kernel_" + name
    if template:
        kname += "_" + make_template_hash(write_template(template))
    for arr in inputs:
        kname += "_" + arr.type_string
        if arr.ndim == 0:
            kname += "s"
        elif arr.is_constant:
            kname += "c"
    for t in output_types:
        kname += "_" + t
    return kname


def write_signature(
    func_name: str,
    header: str,
    source: str,
    inputs: Sequence[InputInfo],
    output_names: Sequence[str],
    output_types: Sequence[str],
    template,
    attrs: Sequence[str],
    infos: Sequence[Tuple[bool, bool, bool]],
    atomic_outputs: bool,
) -> str:
    text = header
    if template:
        params = ", ".join(f"{_template_param_type(v)} {n}" for n, v in template)
        text += f"template <{params}>\n"
    text += f"[[kernel]] void {func_name}(\n"
    index = 0
    for arr, (has_shape, has_strides, has_ndim) in zip(inputs, infos):
        location = "constant" if arr.is_constant else "device"
        ref = "&" if arr.ndim == 0 else "*"
        text += f"  const {location} {arr.type_string}{ref} {arr.name} [[buffer({index})]],\n"
        index += 1
        if arr.ndim > 0:
            if has_shape:
                text += f"  const constant int* {arr.name}_shape [[buffer({index})]],\n"
                index += 1
            if has_strides:
                text += f"  const constant int64_t* {arr.name}_strides [[buffer({index})]],\n"
                index += 1
            if has_ndim:
                text += f"  const constant int& {arr.name}_ndim [[buffer({index})]],\n"
                index += 1
    for name, t in zip(output_names, output_types):
        t = f"atomic<{t}>" if atomic_outputs else t
        text += f"  device {t}* {name} [[buffer({index})]]"
        # MLX compares the buffer index (which counts shape buffers) with the
        # number of arrays; kept as is so the text stays identical.
        if index < len(inputs) + len(output_names) - 1 or attrs:
            text += ",\n"
        else:
            text += ") {\n"
        index += 1
    for i, attr in enumerate(attrs):
        text += attr + (",\n" if i < len(attrs) - 1 else ") {\n")
    text += source + "\n}\n"
    return text


@dataclass(frozen=True)
class Generated:
    """MLX's text for one instantiation plus what the simulator needs to call it."""

    kernel_name: str
    text: str
    template_def: str
    inputs: Tuple[InputInfo, ...]
    infos: Tuple[Tuple[bool, bool, bool], ...]
    output_names: Tuple[str, ...]
    output_types: Tuple[str, ...]
    attributes: Tuple[str, ...]
    atomic_outputs: bool


def generate(name, output_names, source, header, inputs, output_types, template, atomic_outputs) -> Generated:
    template = list(template or [])
    infos = shape_infos(source, [a.name for a in inputs])
    attrs = attributes(source)
    kname = kernel_name(name, template, inputs, output_types)
    text = write_signature(
        kname, header, source, inputs, output_names, output_types, template, attrs, infos, atomic_outputs
    )
    template_def = ""
    if template:
        template_def = kname + write_template(template)
        text += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({template_def}) {template_def};\n'
    return Generated(
        kname, text, template_def, tuple(inputs), tuple(infos), tuple(output_names),
        tuple(output_types), tuple(used_attributes(source)), atomic_outputs,
    )


def verbose_text(name: str, text: str) -> str:
    """What MLX prints for ``verbose=True``."""
    return f"Generated source code for `{name}`:\n```\n{text}\n```\n"


# ---------------------------------------------------------------------------
# MSL text -> C++ for the simulator

_TG_DECL = re.compile(
    r"(?m)^([ \t]*)threadgroup[ \t]+([A-Za-z_][\w:]*(?:[ \t]*<[^;*&()]*?>)?)[ \t]+"
    r"([A-Za-z_]\w*)[ \t]*((?:\[[^\]\n]+\][ \t]*)*);"
)
_TG_ANY = re.compile(r"(?m)^[ \t]*threadgroup[ \t]+[^;(]*;")
_INSTANTIATION = re.compile(r'template \[\[host_name\("[^"]*"\)\]\] \[\[kernel\]\] decltype\(')


def rewrite_threadgroup_declarations(text: str) -> str:
    """`threadgroup T x[N];` -> a reference into the group's shared arena.

    The array type is kept, so UBSan still checks the indices; each
    declaration gets its own arena slot.
    """
    slots = iter(range(1 << 30))

    def rewrite(m):
        indent, type_, name, dims = m.groups()
        if "," in dims:
            raise ValueError(f"unsupported threadgroup declaration: {m.group(0).strip()}")
        slot = next(slots)
        alias = f"__msl_tg{slot}_t"
        return (
            f"{indent}using {alias} = {type_}{dims.strip()}; "
            f"{alias}& {name} = *static_cast<{alias}*>(::msl::rt::tg_alloc({slot}, sizeof({alias}), alignof({alias})));"
        )

    out = _TG_DECL.sub(rewrite, text)
    for m in _TG_ANY.finditer(out):
        stmt = m.group(0).strip()
        if "*" not in stmt and "&" not in stmt:  # pointers into threadgroup memory are fine
            raise ValueError(
                f"mslsim cannot map this threadgroup declaration: {stmt!r}; "
                "write one `threadgroup T name[N];` per line"
            )
    return out


def _param_expr(kind: str, type_: str, i: int) -> str:
    if kind == "ref":
        return f"*static_cast<const {type_}*>(b[{i}])"
    if kind == "out":
        return f"static_cast<{type_}*>(b[{i}])"
    return f"static_cast<const {type_}*>(b[{i}])"


def buffer_layout(gen: Generated) -> List[Tuple[str, str, str]]:
    """(kind, C type, what) per buffer in MLX's order: kind in in/ref/out."""
    layout = []
    for arr, (has_shape, has_strides, has_ndim) in zip(gen.inputs, gen.infos):
        layout.append(("ref" if arr.ndim == 0 else "in", arr.type_string, arr.name))
        if arr.ndim > 0:
            if has_shape:
                layout.append(("in", "int", arr.name + "_shape"))
            if has_strides:
                layout.append(("in", "int64_t", arr.name + "_strides"))
            if has_ndim:
                layout.append(("ref", "int", arr.name + "_ndim"))
    for name, t in zip(gen.output_names, gen.output_types):
        layout.append(("out", f"atomic<{t}>" if gen.atomic_outputs else t, name))
    return layout


def to_cpp(gen: Generated) -> str:
    """A C++ translation unit: the shim, MLX's text (attributes stripped from
    the explicit instantiation, threadgroup arrays mapped) and an entry point."""
    body = rewrite_threadgroup_declarations(gen.text)
    body = _INSTANTIATION.sub("template decltype(", body)
    callee = gen.template_def or gen.kernel_name
    args = [_param_expr(kind, t, i) for i, (kind, t, _) in enumerate(buffer_layout(gen))]
    args += [f"::msl::attr_{a}(a)" for a in gen.attributes]
    call = ",\n      ".join(args)
    return (
        '#include "msl_shim.h"\n'
        f'#line 1 "{gen.kernel_name}.metal"\n'
        f"{body}\n"
        '#line 1 "mslsim-entry"\n'
        'extern "C" void msl_kernel_entry(void* const* b, const ::msl::rt::ThreadAttrs& a) {\n'
        f"  {callee}(\n      {call});\n"
        "}\n"
    )
