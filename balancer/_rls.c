/* One recursive-least-squares step for balancer/step_learner.py: the same arithmetic as its
 * pure-Python `_update_py` (the test oracle), on two array('d') buffers updated in place, without
 * numpy's per-call overhead on 5-element vectors (a sample per replica step: the simulator feeds
 * tens of thousands a run).
 *
 *   update(theta: array('d', 5), p: array('d', 25, row-major), x0..x4, y, lam, p_max) -> bool
 *
 * x is already scaled. Returns False (and leaves both buffers alone) when the step would make
 * either non-finite. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#define N 5

static PyObject *rls_update(PyObject *self, PyObject *args) {
    Py_buffer tb, pb;
    double x[N], y, lam, pmax;
    if (!PyArg_ParseTuple(args, "w*w*dddddddd", &tb, &pb, &x[0], &x[1], &x[2], &x[3], &x[4], &y, &lam, &pmax))
        return NULL;
    PyObject *result = NULL;
    if (tb.len != N * (Py_ssize_t)sizeof(double) || pb.len != N * N * (Py_ssize_t)sizeof(double) ||
        tb.itemsize != sizeof(double) || pb.itemsize != sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "theta must be array('d') of 5 and p array('d') of 25");
        goto done;
    }
    double *t = (double *)tb.buf, *p = (double *)pb.buf;
    double px[N], k[N], th[N], q[N * N];
    double den = lam, pred = 0.0;
    for (int i = 0; i < N; i++) {
        double s = 0.0;
        for (int j = 0; j < N; j++) s += p[i * N + j] * x[j];
        px[i] = s;
    }
    for (int i = 0; i < N; i++) { den += x[i] * px[i]; pred += x[i] * t[i]; }
    double err = y - pred, inv = 1.0 / lam, tr = 0.0;
    int finite = 1;
    for (int i = 0; i < N; i++) {
        k[i] = px[i] / den;
        th[i] = t[i] + k[i] * err;
        finite &= isfinite(th[i]);
    }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) q[i * N + j] = (p[i * N + j] - k[i] * px[j]) * inv;
    for (int i = 0; i < N; i++) tr += q[i * N + i];
    if (tr > pmax) {
        double f = pmax / tr;
        for (int i = 0; i < N * N; i++) q[i] *= f;
    }
    for (int i = 0; i < N * N; i++) finite &= isfinite(q[i]);
    if (finite) {
        for (int i = 0; i < N; i++) t[i] = th[i];
        for (int i = 0; i < N * N; i++) p[i] = q[i];
    }
    result = PyBool_FromLong(finite);
done:
    PyBuffer_Release(&tb);
    PyBuffer_Release(&pb);
    return result;
}

static PyMethodDef methods[] = {
    {"update", rls_update, METH_VARARGS, "One RLS step on array('d') theta (5) and p (25), in place."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rls", "RLS step for balancer.step_learner", -1, methods};

PyMODINIT_FUNC PyInit__rls(void) { return PyModule_Create(&module); }
