/* The python3 executable for aarch64: Debian ships libpython3.11:arm64 but no arm64 interpreter
   beside the native one. */
#include <Python.h>
int main(int argc, char** argv) { return Py_BytesMain(argc, argv); }
