/*
 * migrelay._speedups: in-place WebSocket masking (RFC 6455 section 5.3).
 *
 * Every byte of a migration crosses this loop twice (masked at the source relay,
 * unmasked at the destination), so it XORs 8 bytes at a time over the caller's own
 * writable buffer: no allocation, no copy. The 4-byte key is rotated to the caller's
 * phase so that a frame's payload can be unmasked in pieces as it arrives.
 *
 * scan_data_frames: the receiving side's common case in one call, a read's run of data
 * frames (headers checked, payloads unmasked in place). Measured in `migrelay serve`, the
 * Python parser's per-frame work (header, opcode, frame end, events) was ~15 % of the
 * relay's CPU; anything unusual is left to that parser, which stays the reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

/* GCC builds this function twice on x86-64, plain SSE2 and AVX2, and picks one at load
 * time by CPU: AVX2 doubles the width and measured 53-58 GB/s against 28-47 for SSE2
 * (about memcpy speed on this kind of machine). Other compilers get the portable one. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MIGRELAY_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef MIGRELAY_MULTIVERSION
#define MIGRELAY_MULTIVERSION
#endif

MIGRELAY_MULTIVERSION static void
xor_in_place(unsigned char *data, Py_ssize_t len, const unsigned char key[4], Py_ssize_t phase)
{
    unsigned char rotated[4];
    for (int i = 0; i < 4; i++) {
        rotated[i] = key[(phase + i) & 3];
    }
    Py_ssize_t i = 0;
    if (len >= 16) {
        uint32_t k32;
        memcpy(&k32, rotated, 4);
        uint64_t k64 = ((uint64_t)k32 << 32) | k32;
        /* Unaligned 8-byte loads and stores through memcpy compile to plain movs on
         * x86-64 and aarch64; the compiler vectorises the loop at -O3. */
        for (; i + 8 <= len; i += 8) {
            uint64_t word;
            memcpy(&word, data + i, 8);
            word ^= k64;
            memcpy(data + i, &word, 8);
        }
    }
    for (; i < len; i++) {
        data[i] ^= rotated[i & 3];
    }
}

PyDoc_STRVAR(apply_mask_doc,
"apply_mask(buffer, key, phase=0, /) -> int\n\n"
"XOR the writable buffer in place with the 4-byte key, starting at key index\n"
"phase (0-3). Return the phase for the byte that follows the buffer.");

static PyObject *
apply_mask(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "apply_mask() takes 2 or 3 arguments");
        return NULL;
    }
    Py_ssize_t phase = 0;
    if (nargs == 3) {
        phase = PyLong_AsSsize_t(args[2]);
        if (phase == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (phase < 0 || phase > 3) {
            PyErr_Format(PyExc_ValueError, "phase must be 0-3, not %zd", phase);
            return NULL;
        }
    }
    Py_buffer key;
    if (PyObject_GetBuffer(args[1], &key, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (key.len != 4) {
        PyErr_Format(PyExc_ValueError, "mask key must be 4 bytes, not %zd", key.len);
        PyBuffer_Release(&key);
        return NULL;
    }
    unsigned char k[4];
    memcpy(k, key.buf, 4);
    PyBuffer_Release(&key);

    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    Py_ssize_t len = data.len;
    if (len >= 65536) {
        /* Large buffers: let the other thread run while we XOR. */
        Py_BEGIN_ALLOW_THREADS
        xor_in_place((unsigned char *)data.buf, len, k, phase);
        Py_END_ALLOW_THREADS
    } else {
        xor_in_place((unsigned char *)data.buf, len, k, phase);
    }
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t((phase + len) & 3);
}


/* The receiving side's fast path: see migrelay.core.frames.FrameParser. */
PyDoc_STRVAR(scan_data_frames_doc,
"scan_data_frames(buffer, position, remaining, key, phase, fin, message_bytes,\n"
"                 expect_masked, max_message_bytes, max_headers, /)\n"
"-> (position, remaining, key, phase, fin, message_bytes, headers, spans)\n\n"
"From buffer[position:], take the rest of the current data frame (remaining payload\n"
"bytes; 0: at a header), then whole data frames, unmasking payloads in place and\n"
"listing them as (start, stop) spans. message_bytes is the current message's length\n"
"so far, -1 for none. Stops at the end of the buffer, after max_headers headers, or\n"
"before any header that is not a valid, non-empty binary or continuation frame\n"
"within the limits (incomplete, control, reserved bits, wrong masking, ...): the\n"
"caller's own parser takes that one.");

static PyObject *
scan_data_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "scan_data_frames() takes 10 arguments");
        return NULL;
    }
    Py_ssize_t position = PyLong_AsSsize_t(args[1]);
    unsigned long long remaining = PyLong_AsUnsignedLongLong(args[2]);
    Py_ssize_t phase = PyLong_AsSsize_t(args[4]);
    int fin = PyObject_IsTrue(args[5]);
    long long message_bytes = PyLong_AsLongLong(args[6]);
    int expect_masked = PyObject_IsTrue(args[7]);
    unsigned long long max_message = PyLong_AsUnsignedLongLong(args[8]);
    Py_ssize_t max_headers = PyLong_AsSsize_t(args[9]);
    if (PyErr_Occurred() || fin < 0 || expect_masked < 0) {
        return NULL;
    }
    unsigned char key[4] = {0, 0, 0, 0};
    int masked = 0;
    if (args[3] != Py_None) {
        Py_buffer kb;
        if (PyObject_GetBuffer(args[3], &kb, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        if (kb.len != 4) {
            PyBuffer_Release(&kb);
            PyErr_SetString(PyExc_ValueError, "mask key must be 4 bytes");
            return NULL;
        }
        memcpy(key, kb.buf, 4);
        PyBuffer_Release(&kb);
        masked = 1;
    }
    if (phase < 0 || phase > 3) {
        PyErr_Format(PyExc_ValueError, "phase must be 0-3, not %zd", phase);
        return NULL;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    if (position < 0 || position > data.len) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "position outside the buffer");
        return NULL;
    }
    PyObject *spans = PyList_New(0);
    if (spans == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *buf = (unsigned char *)data.buf;
    Py_ssize_t length = data.len;
    Py_ssize_t headers = 0;
    for (;;) {
        if (remaining > 0) {
            Py_ssize_t available = length - position;
            if (available <= 0) {
                break;
            }
            Py_ssize_t take = (unsigned long long)available < remaining ? available
                                                                        : (Py_ssize_t)remaining;
            if (masked) {
                if (take >= 65536) {
                    /* As apply_mask: let the other threads run while we XOR. */
                    Py_BEGIN_ALLOW_THREADS
                    xor_in_place(buf + position, take, key, phase);
                    Py_END_ALLOW_THREADS
                } else {
                    xor_in_place(buf + position, take, key, phase);
                }
                phase = (phase + take) & 3;
            }
            PyObject *span = Py_BuildValue("(nn)", position, position + take);
            if (span == NULL || PyList_Append(spans, span) < 0) {
                Py_XDECREF(span);
                goto fail;
            }
            Py_DECREF(span);
            position += take;
            remaining -= (unsigned long long)take;
            if (remaining > 0) {
                break; /* the buffer ended inside this frame */
            }
            if (fin) {
                message_bytes = -1; /* the message ended (it was not empty) */
            }
            continue;
        }
        /* At a header: take it only if it is whole and plainly a data frame. */
        if (headers == max_headers) {
            break;
        }
        Py_ssize_t available = length - position;
        if (available < 2) {
            break;
        }
        unsigned char first = buf[position], second = buf[position + 1];
        int frame_masked = (second & 0x80) != 0;
        unsigned int opcode = first & 0x0F;
        if ((first & 0x70) || frame_masked != expect_masked) {
            break;
        }
        if (!(opcode == 2 && message_bytes < 0) && !(opcode == 0 && message_bytes >= 0)) {
            break;
        }
        unsigned long long size = second & 0x7F;
        Py_ssize_t header = 2;
        if (size == 126) {
            if (available < 4) {
                break;
            }
            size = ((unsigned long long)buf[position + 2] << 8) | buf[position + 3];
            if (size < 126) {
                break;
            }
            header = 4;
        } else if (size == 127) {
            if (available < 10) {
                break;
            }
            size = 0;
            for (int i = 0; i < 8; i++) {
                size = (size << 8) | buf[position + 2 + i];
            }
            if (size < 65536 || (size >> 63)) {
                break;
            }
            header = 10;
        }
        if (size == 0) {
            break;
        }
        if (frame_masked) {
            if (available < header + 4) {
                break;
            }
            memcpy(key, buf + position + header, 4);
            header += 4;
        }
        unsigned long long so_far = (message_bytes < 0 ? 0 : (unsigned long long)message_bytes) + size;
        if (so_far > max_message) {
            break;
        }
        message_bytes = (long long)so_far;
        masked = frame_masked;
        fin = (first & 0x80) != 0;
        phase = 0;
        remaining = size;
        position += header;
        headers++;
    }
    PyBuffer_Release(&data);
    PyObject *key_object;
    if (masked) {
        key_object = PyBytes_FromStringAndSize((const char *)key, 4);
        if (key_object == NULL) {
            Py_DECREF(spans);
            return NULL;
        }
    } else {
        key_object = Py_NewRef(Py_None);
    }
    return Py_BuildValue("(nKNnOLnN)", position, remaining, key_object, phase,
                         fin ? Py_True : Py_False, message_bytes, headers, spans);
fail:
    PyBuffer_Release(&data);
    Py_DECREF(spans);
    return NULL;
}

PyDoc_STRVAR(send_nogil_doc,
"send_nogil(fd, buffer, /) -> int\n\n"
"send() as much of the buffer to the non-blocking socket fd as it takes now, without\n"
"holding the GIL. Return the bytes sent: 0 when the socket's buffer is full, -1 on\n"
"any other error (the caller then writes through its transport, which reports it).");

static PyObject *
send_nogil(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send_nogil() takes 2 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "not a file descriptor: %ld", fd);
        return NULL;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t sent;
    /* The copy into the kernel is most of a relay's per-byte cost: other threads (the
     * channels of other workers) run meanwhile. MSG_NOSIGNAL: a closed peer is an
     * error to report, not a signal. */
    Py_BEGIN_ALLOW_THREADS
    do {
        sent = send((int)fd, data.buf, (size_t)data.len, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (sent < 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (sent < 0) {
        sent = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    }
    return PyLong_FromSsize_t(sent);
}

static PyMethodDef speedups_methods[] = {
    {"apply_mask", (PyCFunction)(void (*)(void))apply_mask, METH_FASTCALL, apply_mask_doc},
    {"scan_data_frames", (PyCFunction)(void (*)(void))scan_data_frames, METH_FASTCALL,
     scan_data_frames_doc},
    {"send_nogil", (PyCFunction)(void (*)(void))send_nogil, METH_FASTCALL, send_nogil_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "migrelay._speedups",
    .m_doc = "In-place WebSocket masking, 8 bytes at a time, and the data-frame fast path.",
    .m_size = 0,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
