// Lets Python load the extension with `import sparsekern._C`; importing runs the TORCH_LIBRARY
// registrations compiled into this shared object. CMake builds for C++ users leave this file out.
#include <Python.h>

static struct PyModuleDef sparsekern_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparsekern_module); }
