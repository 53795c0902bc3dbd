/* One recursive-least-squares step for balancer/step_learner.py: the same arithmetic as its
 * pure-Python `_update_n` (the test oracle), on two array('d') buffers updated in place, without
 * numpy's per-call overhead on 5-element vectors (a sample per replica step: the simulator feeds
 * tens of thousands a run).
 *
 *   update(theta: array('d', 5), p: array('d', 25, row-major), x0..x4, y, lam, p_max) -> bool
 *   update6(theta: array('d', 6), p: array('d', 36, row-major), x0..x5, y, lam, p_max) -> bool
 *
 *   update_n(theta: array('d', n), p: array('d', n*n), x: array('d', n), y, lam, p_max) -> bool
 *
 * (update6: the model with a replica's KV-tier load time as a sixth feature; update_n: any n up
 * to NMAX, the KV-tier load model of up to nine features.) x is already scaled. Returns False
 * (and leaves both buffers alone) when the step would make either non-finite. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#define NMAX 9

/* The step for n features on t (n) and p (n*n) in place; 1 if applied, 0 if non-finite. */
static int rls_step(int n, double *t, double *p, const double *x, double y, double lam, double pmax) {
    double px[NMAX], k[NMAX], th[NMAX], q[NMAX * NMAX];
    double den = lam, pred = 0.0;
    for (int i = 0; i < n; i++) {
        double s = 0.0;
        for (int j = 0; j < n; j++) s += p[i * n + j] * x[j];
        px[i] = s;
    }
    for (int i = 0; i < n; i++) { den += x[i] * px[i]; pred += x[i] * t[i]; }
    double err = y - pred, inv = 1.0 / lam, tr = 0.0;
    int finite = 1;
    for (int i = 0; i < n; i++) {
        k[i] = px[i] / den;
        th[i] = t[i] + k[i] * err;
        finite &= isfinite(th[i]);
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) q[i * n + j] = (p[i * n + j] - k[i] * px[j]) * inv;
    for (int i = 0; i < n; i++) tr += q[i * n + i];
    if (tr > pmax) {
        double f = pmax / tr;
        for (int i = 0; i < n * n; i++) q[i] *= f;
    }
    for (int i = 0; i < n * n; i++) finite &= isfinite(q[i]);
    if (finite) {
        for (int i = 0; i < n; i++) t[i] = th[i];
        for (int i = 0; i < n * n; i++) p[i] = q[i];
    }
    return finite;
}

static PyObject *rls_update_n(PyObject *args, int n, const char *format) {
    Py_buffer tb, pb;
    double x[NMAX], y, lam, pmax;
    int ok = n == 5 ? PyArg_ParseTuple(args, format, &tb, &pb, &x[0], &x[1], &x[2], &x[3], &x[4], &y, &lam, &pmax)
                    : PyArg_ParseTuple(args, format, &tb, &pb, &x[0], &x[1], &x[2], &x[3], &x[4], &x[5], &y, &lam, &pmax);
    if (!ok)
        return NULL;
    PyObject *result = NULL;
    if (tb.len != n * (Py_ssize_t)sizeof(double) || pb.len != n * n * (Py_ssize_t)sizeof(double) ||
        tb.itemsize != sizeof(double) || pb.itemsize != sizeof(double)) {
        PyErr_Format(PyExc_ValueError, "theta must be array('d') of %d and p array('d') of %d", n, n * n);
        goto done;
    }
    result = PyBool_FromLong(rls_step(n, (double *)tb.buf, (double *)pb.buf, x, y, lam, pmax));
done:
    PyBuffer_Release(&tb);
    PyBuffer_Release(&pb);
    return result;
}

static PyObject *rls_update(PyObject *self, PyObject *args) { return rls_update_n(args, 5, "w*w*dddddddd"); }

static PyObject *rls_update6(PyObject *self, PyObject *args) { return rls_update_n(args, 6, "w*w*ddddddddd"); }

static PyObject *rls_update_any(PyObject *self, PyObject *args) {
    Py_buffer tb, pb, xb;
    double y, lam, pmax;
    if (!PyArg_ParseTuple(args, "w*w*y*ddd", &tb, &pb, &xb, &y, &lam, &pmax))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = tb.len / (Py_ssize_t)sizeof(double);
    if (n < 1 || n > NMAX || tb.itemsize != sizeof(double) || pb.itemsize != sizeof(double) ||
        xb.itemsize != sizeof(double) || tb.len != n * (Py_ssize_t)sizeof(double) ||
        pb.len != n * n * (Py_ssize_t)sizeof(double) || xb.len != n * (Py_ssize_t)sizeof(double)) {
        PyErr_Format(PyExc_ValueError, "theta and x must be array('d') of the same n <= %d and p array('d') of n*n", NMAX);
        goto done;
    }
    result = PyBool_FromLong(rls_step((int)n, (double *)tb.buf, (double *)pb.buf, (const double *)xb.buf, y, lam, pmax));
done:
    PyBuffer_Release(&tb);
    PyBuffer_Release(&pb);
    PyBuffer_Release(&xb);
    return result;
}

static PyMethodDef methods[] = {
    {"update", rls_update, METH_VARARGS, "One RLS step on array('d') theta (5) and p (25), in place."},
    {"update6", rls_update6, METH_VARARGS, "One RLS step on array('d') theta (6) and p (36), in place."},
    {"update_n", rls_update_any, METH_VARARGS, "One RLS step on array('d') theta (n <= 9), p (n*n) and x (n), in place."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rls", "RLS step for balancer.step_learner", -1, methods};

PyMODINIT_FUNC PyInit__rls(void) { return PyModule_Create(&module); }
