"""The extension's files: terminology, CMake lists, icon and screenshot."""

from __future__ import annotations

import json
import re

from PIL import Image
from scdlsegment_testing import MODULE_DIR, REPO_ROOT

from scdlcore.labels import SYNAPSE13

MODULE_CMAKE = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
EXTENSION_CMAKE = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


def cmake_list(name: str) -> list[str]:
    """The items of ``set(NAME ...)`` in the module CMakeLists, with ${MODULE_NAME} expanded."""
    body = re.search(rf"set\({name}\s+(.*?)\)", MODULE_CMAKE, re.S).group(1)
    return [item.replace("${MODULE_NAME}", "SCDLSegment") for item in body.split()]


def test_terminology_file_is_the_label_table_terminology():
    shipped = json.loads((MODULE_DIR / "Resources" / "SCDLSegment.term.json").read_text(encoding="utf-8"))
    assert shipped == SYNAPSE13.slicer_terminology()


def test_module_cmake_lists_every_python_file_and_resource():
    scripts = cmake_list("MODULE_PYTHON_SCRIPTS")
    resources = cmake_list("MODULE_PYTHON_RESOURCES")
    on_disk_scripts = sorted(str(path.relative_to(MODULE_DIR)) for path in MODULE_DIR.rglob("*.py"))
    on_disk_resources = sorted(
        str(path.relative_to(MODULE_DIR)) for path in (MODULE_DIR / "Resources").rglob("*") if path.is_file()
    )
    assert sorted(scripts) == on_disk_scripts
    assert sorted(resources) == on_disk_resources


def test_module_cmake_builds_tests_and_ships_the_engine_package():
    assert "WITH_GENERIC_TESTS" in MODULE_CMAKE
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in MODULE_CMAKE
    assert "../SCDLCore/scdlcore" in MODULE_CMAKE and "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in MODULE_CMAKE


def test_extension_cmake_metadata_points_at_files_that_exist():
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in EXTENSION_CMAKE
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in EXTENSION_CMAKE
    assert "add_subdirectory(SCDLSegment)" in EXTENSION_CMAKE
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        url = re.search(rf'set\({variable} "([^"]+)"\)', EXTENSION_CMAKE).group(1)
        assert (REPO_ROOT / url.split("/main/", 1)[1]).is_file(), url
    for include in ("${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"):
        assert f"include({include})" in EXTENSION_CMAKE


def test_icon_is_a_128_pixel_png():
    with Image.open(MODULE_DIR / "Resources" / "Icons" / "SCDLSegment.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def test_panel_screenshot_exists():
    with Image.open(REPO_ROOT / "Resources" / "Screenshots" / "panel.png") as screenshot:
        assert screenshot.format == "PNG" and screenshot.width >= 400 and screenshot.height >= 800
