"""Static check: every Slicer name SCDLSegment.py uses is one that Slicer 5.10/5.12 has.

The reference is slicer_api_names.txt, extracted from the team's full Slicer API reference (design notes
kept outside this repository, read from Slicer's v5.10.0 and v5.12.3 sources) by extract_slicer_api_names.py
and checked in, so this test does not need that reference; SCDLSegment/docs/SLICER_API.md sums up the facts
the module relies on. Two checks:

1. every ``slicer.…`` attribute path (through ``import slicer.x as y`` and ``from slicer… import``
   too, and through calls such as ``slicer.modules.terminologies.logic().Load…``) is a listed name;
2. every CamelCase method called on any other object (MRML nodes, segments, matrices) is a
   member of some listed Slicer/VTK class, so a misspelt VTK method fails here, not in Slicer.
"""

from __future__ import annotations

import ast

import pytest
from scdlsegment_testing import MODULE_DIR, TESTS_DIR

NAMES = {
    line.strip()
    for line in (TESTS_DIR / "slicer_api_names.txt").read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
}
MEMBERS = {name.rsplit(".", 1)[1] for name in NAMES if name.count(".") >= 2}
#: CamelCase names on non-Slicer objects that are not Slicer API: the PyTorch extension's logic
#: class (SCDLSegment/docs/SLICER_API.md, end of section 6) and this module's own classes.
NOT_SLICER = {"PyTorchUtilsLogic"}
#: Slicer names slicer_api_names.txt lacks, with where Slicer itself uses them: slicer.app's Qt connect of
#: "startupCompleted()" (the scripted-module template, SCDLSegment/docs/SLICER_API.md section 5) and the segment editor
#: effect factory (Modules/Scripted/SegmentEditor/SegmentEditor.py connects its "effectRegistered(QString)").
USED_BY_SLICER_ITSELF = {"slicer.app.connect", "slicer.qSlicerSegmentEditorEffectFactory.instance"}

SOURCE = (MODULE_DIR / "SCDLSegment.py").read_text(encoding="utf-8")


def slicer_paths(tree: ast.AST) -> set[str]:
    """Qualified ``slicer.…`` paths used in the module (the longest form of each chain)."""
    aliases = {"slicer": "slicer"}
    paths = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "slicer":
                    aliases[alias.asname or "slicer"] = alias.name if alias.asname else "slicer"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "slicer":
            paths.update(f"{node.module}.{alias.name}" for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (chain := _chain(node, aliases)) is not None:
            paths.add(chain)
    return {path for path in paths if not any(other.startswith((path + ".", path + "().")) for other in paths)}


def _chain(node, aliases) -> str | None:
    """``slicer.a.b`` for an attribute chain rooted at slicer; a call continues the chain only for
    module logic accessors (``slicer.modules.x.logic().Method``), whose result is a Slicer class."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _chain(node.value, aliases)
        return None if base is None else f"{base}.{node.attr}"
    if isinstance(node, ast.Call):
        base = _chain(node.func, aliases)
        return f"{base}()" if base is not None and base.endswith(".logic") else None
    return None


def own_names(tree: ast.AST) -> set[str]:
    """Names this project defines (classes in the module, the Lib's public names)."""
    names = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    for path in (MODULE_DIR / "SCDLSegmentLib").glob("*.py"):
        lib = ast.parse(path.read_text(encoding="utf-8"))
        names |= {node.name for node in ast.walk(lib) if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        names |= {
            target.id
            for node in ast.walk(lib)
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
    return names


def camel_case_calls(tree: ast.AST) -> set[str]:
    """CamelCase attributes called or read on objects that are neither slicer.*, qt.*, nor this project's."""
    roots_skipped = {
        "slicer",
        "qt",
        "vtk",
        "slicerPackaging",
        "subprocess",
    }  # slicer: checked above; others: not Slicer
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr[:1].isupper():
            root = node.value
            while isinstance(root, (ast.Attribute, ast.Call)):
                root = root.value if isinstance(root, ast.Attribute) else root.func
            if not (isinstance(root, ast.Name) and root.id in roots_skipped):
                found.add(node.attr)
    return found


def test_every_slicer_path_is_a_listed_slicer_name():
    paths = slicer_paths(ast.parse(SOURCE))
    assert "slicer.util.updateSegmentBinaryLabelmapFromArray" in paths  # the walker sees the module's calls
    assert "slicer.modules.terminologies.logic().LoadTerminologyFromFile" in paths
    assert "slicer.packaging.pip_ensure" in paths  # through "import slicer.packaging as slicerPackaging"
    unknown = sorted(path for path in paths if path not in NAMES | USED_BY_SLICER_ITSELF)
    assert unknown == [], f"not in SLICER_API.md: {unknown}"


def test_every_camel_case_method_on_nodes_is_a_slicer_or_vtk_member():
    tree = ast.parse(SOURCE)
    unknown = sorted(camel_case_calls(tree) - MEMBERS - own_names(tree) - NOT_SLICER)
    assert unknown == [], f"not a member of any class in SLICER_API.md: {unknown}"


@pytest.mark.parametrize(
    ("snippet", "bad"),
    [
        ("slicer.util.updateSegmentFromArray(a, b, c)", "slicer.util.updateSegmentFromArray"),
        ("slicer.util.pip_ensure(['x'])", "slicer.util.pip_ensure"),
        ("import slicer.packaging as p\np.pip_check2('x')", "slicer.packaging.pip_check2"),
        ("slicer.mrmlScene.AddNewNode('x')", "slicer.mrmlScene.AddNewNode"),
    ],
)
def test_the_check_catches_names_slicer_does_not_have(snippet, bad):
    paths = slicer_paths(ast.parse(snippet))
    assert bad in paths and bad not in NAMES


def test_a_misspelt_vtk_method_is_caught():
    tree = ast.parse("segmentation.GetSegmentIDBySegmentName('Liver')\nsegmentation.GetSegmentIdBySegmentName('x')")
    assert camel_case_calls(tree) - MEMBERS == {"GetSegmentIDBySegmentName"}


def test_the_name_list_is_the_extraction_of_slicer_api_md():
    """slicer_api_names.txt holds names from every part of the full API reference it was extracted from."""
    for expected in (
        "slicer.util.arrayFromVolume",
        "slicer.packaging.pip_ensure",
        "slicer.mrmlScene.AddNewNodeByClass",
        "slicer.vtkSegmentation.AddEmptySegment",
        "slicer.parameterNodeWrapper.parameterNodeWrapper",
        "slicer.i18n.translate",
        "slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode",
        "slicer.vtkSlicerSegmentEditorLogic.SaveStateForUndo",
    ):
        assert expected in NAMES
    assert "slicer.util.pip_ensure" not in NAMES and "slicer.util.updateSegmentFromArray" not in NAMES
