"""Reading and writing CTs and label maps with exact geometry (SimpleITK): the only place file formats live."""
