// The Python module `treepo_kernels._C`: importing it registers the torch ops of this folder
// (torch.ops.treepo.*). It holds no Python functions of its own.
#include <Python.h>

static struct PyModuleDef treepo_c_module = {PyModuleDef_HEAD_INIT, "_C", "treepo CPU kernels (torch.ops.treepo)",
                                              -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&treepo_c_module); }
