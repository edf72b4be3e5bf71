"""Extract the qualified 3D Slicer API names listed in the full SLICER_API.md into slicer_api_names.txt.

The full SLICER_API.md (the team's design notes, kept outside this repository, read from Slicer's v5.10.0 and
v5.12.3 sources; SCDLSegment/docs/SLICER_API.md is only a short digest of it) lists the Python-visible
names a scripted module calls. This script turns its code blocks into one
qualified name per line, which ``test_module_slicer_api.py`` checks SCDLSegment.py against:

- ``slicer.util.<function or class>``, ``slicer.packaging.<function>`` (5.12 only),
  ``slicer.parameterNodeWrapper.<name>``, ``slicer.ScriptedLoadableModule.<class>``,
  ``slicer.i18n.<name>``, ``slicer.cli.<name>``, ``slicer.testing.<name>``;
- ``slicer.<vtk/MRML class>`` and ``slicer.<class>.<method or enum value>`` for the wrapped C++ classes;
- ``slicer.mrmlScene.<vtkMRMLScene member>``; ``slicer.modules.<name>.logic().<member>`` for the
  module logics the document names.

Usage: ``python extract_slicer_api_names.py PATH/TO/SLICER_API.md > slicer_api_names.txt``
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HEADER = "# Qualified Slicer API names, extracted from SLICER_API.md by extract_slicer_api_names.py; do not edit.\n"
_SECTION = re.compile(r"^## (\d+)\.")
_SUBSECTION = re.compile(r"^### (\d+\.\d+)")
_CLASS_HEADER = re.compile(r"^((?:vtk|q)\w+)\s+\(base:")
_PY_CLASS = re.compile(r"^\s*class (\w+)")
_CALL = re.compile(r"(\w+)\(")
_LOGIC = re.compile(r"slicer\.modules\.(\w+)\.logic\(\)")
_SCENE_CLASS = "vtkMRMLScene"
_EFFECT_CLASS = "qSlicerSegmentEditorAbstractEffect"  # 6.10's anonymous block is this class's Python API
_MODULE_LOGICS = {
    "segmentations": "vtkSlicerSegmentationsModuleLogic",
    "terminologies": "vtkSlicerTerminologiesModuleLogic",
}
_NAMESPACES = {
    "1": "slicer.util",
    "2": "slicer.packaging",
    "3": "slicer.ScriptedLoadableModule",
    "4": "slicer.parameterNodeWrapper",
}


def extract(markdown: str) -> list[str]:
    names: set[str] = set()
    members: dict[str, set[str]] = {}
    section = subsection = ""
    in_code = False
    current_class: str | None = None
    namespace: str | None = None
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code, current_class = not in_code, None
            namespace = _NAMESPACES.get(section) if section != "5" else "slicer.i18n"
            continue
        if not in_code:
            if match := _SECTION.match(line):
                section, subsection = match.group(1), ""
            elif match := _SUBSECTION.match(line):
                subsection = match.group(1)
            names.update(f"slicer.modules.{module}.logic" for module in _LOGIC.findall(line))
            continue
        if section == "6":
            current_class = _cpp_line(line, current_class, subsection, members)
        elif namespace:
            namespace = _python_line(line, namespace, names)
    for cls, cls_members in members.items():
        names.add(f"slicer.{cls}")
        names.update(f"slicer.{cls}.{member}" for member in cls_members)
    names.update(f"slicer.mrmlScene.{member}" for member in members.get(_SCENE_CLASS, ()))
    names.add("slicer.mrmlScene")
    for module, cls in _MODULE_LOGICS.items():
        if f"slicer.modules.{module}.logic" in names:
            names.update(f"slicer.modules.{module}.logic().{member}" for member in members.get(cls, ()))
    return sorted(names)


def _cpp_line(line: str, current_class: str | None, subsection: str, members: dict[str, set[str]]) -> str | None:
    if match := _CLASS_HEADER.match(line):
        members.setdefault(match.group(1), set())
        return match.group(1)
    owner = current_class or (_EFFECT_CLASS if subsection == "6.10" else None)
    text = line.strip()
    if owner is None or not text:
        return current_class
    members.setdefault(owner, set())
    if text.startswith("enum"):
        members[owner].update(value.strip() for value in text.split(":", 1)[1].split("(")[0].split(","))
    elif text.startswith("property:"):
        members[owner].add(text.split()[2])
    elif match := _CALL.search(text):
        members[owner].add(match.group(1))
    return current_class


def _python_line(line: str, namespace: str, names: set[str]) -> str:
    text = line.strip()
    if re.match(r"^(slicer\.\w+|SampleData module) \(", text):  # "slicer.cli (Base/Python/slicer/cli.py, ...):"
        return text.split()[0] + ":"  # the trailing ":" marks a namespace whose functions are indented
    indented_functions = namespace.endswith(":")
    namespace = namespace.rstrip(":")
    if text.startswith("Module constants:"):
        names.update(f"{namespace}.{value.strip(' .')}" for value in text.split(":", 1)[1].split(","))
    elif (
        (match := _PY_CLASS.match(line))
        or (indented_functions or not line.startswith((" ", "\t", "[", "#")))
        and (match := _CALL.match(text))
    ):
        names.add(f"{namespace}.{match.group(1)}")
    elif re.match(r"^\w+ = ", text):
        names.add(f"{namespace}.{text.split()[0]}")
    elif re.match(r"^[A-Z]\w*(, \w+)+,?$", text):  # "Serializer, ValidatedSerializer, ..."
        names.update(f"{namespace}.{value.strip()}" for value in text.rstrip(",").split(","))
    return namespace + (":" if indented_functions else "")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    names = [name for name in extract(Path(sys.argv[1]).read_text(encoding="utf-8")) if name.startswith("slicer.")]
    sys.stdout.write(HEADER + "".join(f"{name}\n" for name in names))


if __name__ == "__main__":
    main()
