/*
 * Chunk copies between two open files without holding the interpreter lock.
 *
 * A resync copies thousands of scattered 4 KiB chunks per trigger.  Done from
 * Python, each chunk costs two interpreter round trips and two lock hand-offs
 * with the thread serving the host; here a whole step of chunks is one call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BUF_SIZE (256 * 1024)

struct failure {
    int err;
    const char *side;
    long long offset;
};

/* Copy [off, off + len) from src to dst at the same offset; reads past the
 * source's end give zeros (a backing file may be shorter than the LU). */
static int copy_span(int src, int dst, int64_t off, int64_t len, char *buf, struct failure *f)
{
    while (len > 0) {
        size_t want = len < BUF_SIZE ? (size_t)len : BUF_SIZE;
        size_t have = 0;
        while (have < want) {
            ssize_t n = pread(src, buf + have, want - have, off + (int64_t)have);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                f->err = errno;
                f->side = "read";
                f->offset = off + (int64_t)have;
                return -1;
            }
            if (n == 0) {
                memset(buf + have, 0, want - have);
                break;
            }
            have += (size_t)n;
        }
        size_t done = 0;
        while (done < want) {
            ssize_t n = pwrite(dst, buf + done, want - done, off + (int64_t)done);
            if (n <= 0) {
                if (n < 0 && errno == EINTR)
                    continue;
                f->err = n < 0 ? errno : EIO; /* a write of nothing would loop forever */
                f->side = "write";
                f->offset = off + (int64_t)done;
                return -1;
            }
            done += (size_t)n;
        }
        off += (int64_t)want;
        len -= (int64_t)want;
    }
    return 0;
}

static PyObject *copy_chunks(PyObject *self, PyObject *args)
{
    int src, dst;
    PyObject *array;
    Py_buffer chunks;
    long long chunk_size, limit;
    if (!PyArg_ParseTuple(args, "iiOLL", &src, &dst, &array, &chunk_size, &limit))
        return NULL;
    if (PyObject_GetBuffer(array, &chunks, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (chunks.itemsize != 4 || chunks.format == NULL || strcmp(chunks.format, "I") != 0
            || chunk_size <= 0 || limit < 0) {
        PyBuffer_Release(&chunks);
        PyErr_SetString(PyExc_ValueError,
                        "copy_chunks wants ascending uint32 chunk numbers, a positive chunk"
                        " size and a limit");
        return NULL;
    }
    char *buf = NULL;  /* page-aligned, as O_DIRECT descriptors need */
    if (posix_memalign((void **)&buf, 4096, BUF_SIZE) != 0) {
        PyBuffer_Release(&chunks);
        return PyErr_NoMemory();
    }
    const uint32_t *c = chunks.buf;
    Py_ssize_t count = chunks.len / 4;
    struct failure f = {0, NULL, 0};
    long long copied = 0;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
    while (i < count && rc == 0) {
        Py_ssize_t j = i + 1;  /* consecutive chunks make one run */
        while (j < count && (uint64_t)c[j] == (uint64_t)c[j - 1] + 1)
            j++;
        int64_t start = (int64_t)c[i] * chunk_size;
        int64_t end = ((int64_t)c[j - 1] + 1) * chunk_size;
        if (end > limit)
            end = limit;
        if (start < end) {
            rc = copy_span(src, dst, start, end - start, buf, &f);
            if (rc == 0)
                copied += end - start;
        }
        i = j;
    }
    Py_END_ALLOW_THREADS
    free(buf);
    PyBuffer_Release(&chunks);
    if (rc == 0)
        return PyLong_FromLongLong(copied);
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", f.err, strerror(f.err));
    if (exc == NULL)
        return NULL;
    PyObject *where = Py_BuildValue("(sL)", f.side, f.offset);
    if (where == NULL || PyObject_SetAttrString(exc, "where", where) < 0) {
        Py_XDECREF(where);
        Py_DECREF(exc);
        return NULL;
    }
    Py_DECREF(where);
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

static PyMethodDef methods[] = {
    {"copy_chunks", copy_chunks, METH_VARARGS,
     "copy_chunks(src_fd, dst_fd, chunks, chunk_size, limit) -> bytes copied\n\n"
     "Copy each chunk numbered in ``chunks`` (ascending uint32) from src_fd to dst_fd at\n"
     "the same offset, consecutive chunks as one run, nothing at or past ``limit``.\n"
     "Reads past the source's end give zeros.  On failure raises OSError with\n"
     "``where`` = (\"read\" or \"write\", offset)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_chunkcopy",
    "Chunk copies between two open files without the interpreter lock.", -1, methods,
};

PyMODINIT_FUNC PyInit__chunkcopy(void) { return PyModule_Create(&module); }
