/*
 * modelpool_predict: send one FP32 tensor to a modelpool model and print what comes back.
 *
 * Written only from docs/PROTOCOL.md (sections 2, 3 and 7): a DEALER socket, MDPC01 framing,
 * a msgpack request header and one raw little-endian tensor frame per input.
 *
 *   modelpool_predict [-t TIMEOUT_MS] [-o OUTPUT]... ENDPOINT MODEL INPUT_NAME DIM... [-- VALUE...]
 *
 * Without "--", the values are read from stdin, separated by whitespace or commas.
 * Exit status: 0 ok, 1 the pool answered an error status, 2 no reply in time, 3 a local or protocol
 * failure, 64 bad usage.
 */
#define _POSIX_C_SOURCE 200809L

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <msgpack.h>
#include <zmq.h>

enum { EXIT_ERROR_STATUS = 1, EXIT_TIMEOUT = 2, EXIT_BROKEN = 3, EXIT_USAGE = 64 };

#define CLIENT_PROTOCOL "MDPC01"
#define MAX_ID_BYTES 255
#define MAX_DIMS 32
#define DEFAULT_TIMEOUT_MS 10000L
/* The deadline sent to the broker only covers queueing; allow this much more for the model call. */
#define RECEIVE_GRACE_MS 2000L

struct frame {
    unsigned char *data; /* malloc'd copy, so suitably aligned for any element type */
    size_t size;
};

struct message {
    struct frame *frames;
    size_t count;
};

struct request {
    const char *endpoint;
    const char *model;
    const char *input_name;
    uint64_t shape[MAX_DIMS];
    size_t ndim;
    long timeout_ms;
    const char **outputs;
    size_t n_outputs;
    char **value_args; /* the values after "--", or NULL to read stdin */
    size_t n_value_args;
};

struct datatype {
    const char *name;
    size_t itemsize; /* 0 for BYTES */
    char kind;       /* 'b' bool, 'u' unsigned, 'i' signed, 'f' float, 's' BYTES */
};

static const struct datatype DATATYPES[] = {
    {"BOOL", 1, 'b'},   {"UINT8", 1, 'u'}, {"UINT16", 2, 'u'}, {"UINT32", 4, 'u'}, {"UINT64", 8, 'u'},
    {"INT8", 1, 'i'},   {"INT16", 2, 'i'}, {"INT32", 4, 'i'},  {"INT64", 8, 'i'},  {"FP16", 2, 'f'},
    {"FP32", 4, 'f'},   {"FP64", 8, 'f'},  {"BYTES", 0, 's'},
};

/* docs/PROTOCOL.md 3.2: error types a client recognises, and the fallback class per status. */
static const char *const ERROR_TYPES[] = {
    "PoolError",      "ProtocolError", "InvalidInput", "ModelNotFound", "Overloaded",
    "ModelError",     "WorkerCrashed", "NotSupported", "Unavailable",   "RequestTimeout",
};

static const struct {
    const char *status;
    const char *type;
} STATUS_TYPES[] = {
    {"400", "InvalidInput"}, {"404", "ModelNotFound"}, {"429", "Overloaded"},   {"500", "ModelError"},
    {"501", "NotSupported"}, {"503", "Unavailable"},   {"504", "RequestTimeout"},
};

static void usage(FILE *out)
{
    fputs("usage: modelpool_predict [-t TIMEOUT_MS] [-o OUTPUT]... ENDPOINT MODEL INPUT_NAME DIM... "
          "[-- VALUE...]\n"
          "\n"
          "Send one FP32 tensor of shape DIM... to MODEL through the modelpool broker at ENDPOINT and\n"
          "print every output tensor (name, datatype, shape, values; argmax per row when 2-D).\n"
          "INPUT_NAME \"\" binds to the model's only input. Without \"--\", the product(DIM...) values\n"
          "are read from stdin, separated by whitespace or commas.\n"
          "\n"
          "  -t TIMEOUT_MS  deadline sent with the request (default 10000); the client waits 2 s more\n"
          "  -o OUTPUT      return this output (or Keras layer) only; repeat for several\n"
          "\n"
          "exit status: 0 ok, 1 error status from the pool, 2 no reply in time, 3 local or protocol\n"
          "failure, 64 usage\n",
          out);
}

static int parse_u64(const char *text, uint64_t *value)
{
    char *end;
    if (*text == '\0' || !isdigit((unsigned char)*text))
        return -1;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || *end != '\0')
        return -1;
    *value = v;
    return 0;
}

static int parse_args(int argc, char **argv, struct request *req)
{
    int i = 1;
    memset(req, 0, sizeof *req);
    req->timeout_ms = DEFAULT_TIMEOUT_MS;
    req->outputs = calloc((size_t)argc, sizeof *req->outputs);
    if (req->outputs == NULL)
        return -1;
    for (; i < argc && argv[i][0] == '-' && argv[i][1] != '\0'; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            exit(0);
        }
        if ((strcmp(argv[i], "-t") == 0 || strcmp(argv[i], "-o") == 0) && i + 1 >= argc) {
            fprintf(stderr, "modelpool_predict: %s needs a value\n", argv[i]);
            return -1;
        }
        if (strcmp(argv[i], "-t") == 0) {
            uint64_t t;
            if (parse_u64(argv[++i], &t) != 0 || t > INT32_MAX) {
                fprintf(stderr, "modelpool_predict: -t wants milliseconds >= 0, got '%s'\n", argv[i]);
                return -1;
            }
            req->timeout_ms = (long)t;
        } else if (strcmp(argv[i], "-o") == 0) {
            req->outputs[req->n_outputs++] = argv[++i];
        } else {
            fprintf(stderr, "modelpool_predict: unknown option '%s'\n", argv[i]);
            return -1;
        }
    }
    if (argc - i < 4) {
        usage(stderr);
        return -1;
    }
    req->endpoint = argv[i++];
    req->model = argv[i++];
    req->input_name = argv[i++];
    size_t model_len = strlen(req->model);
    if (model_len == 0 || model_len > MAX_ID_BYTES) {
        fprintf(stderr, "modelpool_predict: MODEL must be 1 to %d bytes\n", MAX_ID_BYTES);
        return -1;
    }
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (req->ndim == MAX_DIMS) {
            fprintf(stderr, "modelpool_predict: at most %d dimensions\n", MAX_DIMS);
            return -1;
        }
        if (parse_u64(argv[i], &req->shape[req->ndim]) != 0) {
            fprintf(stderr, "modelpool_predict: a dimension must be an integer >= 0, got '%s'\n", argv[i]);
            return -1;
        }
        req->ndim++;
    }
    if (req->ndim == 0) {
        fputs("modelpool_predict: give the input's shape, batch first (e.g. 1 64)\n", stderr);
        return -1;
    }
    if (i < argc) { /* "--" */
        req->value_args = argv + i + 1;
        req->n_value_args = (size_t)(argc - i - 1);
    }
    return 0;
}

/* product(shape), or -1 if it does not fit in a buffer of itemsize-byte elements. */
static int element_count(const uint64_t *shape, size_t ndim, size_t itemsize, size_t *count)
{
    size_t n = 1;
    size_t limit = SIZE_MAX / (itemsize ? itemsize : 1);
    for (size_t d = 0; d < ndim; d++) {
        if (shape[d] != 0 && n > limit / shape[d])
            return -1;
        n *= (size_t)shape[d];
    }
    *count = n;
    return 0;
}

static int parse_float(const char *text, float *value)
{
    char *end;
    errno = 0;
    *value = strtof(text, &end);
    /* ERANGE on underflow still gives the nearest float; only overflow is refused */
    return (end == text || *end != '\0' || (errno == ERANGE && isinf(*value))) ? -1 : 0;
}

/* Read float tokens from the "--" arguments or stdin; exactly `want` of them. */
static float *read_values(const struct request *req, size_t want)
{
    float *values = malloc(want ? want * sizeof *values : 1);
    size_t got = 0;
    if (values == NULL)
        return NULL;
    if (req->value_args != NULL) {
        for (size_t k = 0; k < req->n_value_args; k++, got++) {
            if (got < want && parse_float(req->value_args[k], &values[got]) != 0) {
                fprintf(stderr, "modelpool_predict: not a number: '%s'\n", req->value_args[k]);
                goto fail;
            }
        }
    } else {
        char token[128];
        size_t len = 0;
        for (int c = getchar();; c = getchar()) {
            if (c != EOF && !isspace(c) && c != ',') {
                if (len + 1 == sizeof token) {
                    fputs("modelpool_predict: a value on stdin is too long\n", stderr);
                    goto fail;
                }
                token[len++] = (char)c;
                continue;
            }
            if (len > 0) {
                token[len] = '\0';
                if (got < want && parse_float(token, &values[got]) != 0) {
                    fprintf(stderr, "modelpool_predict: not a number on stdin: '%s'\n", token);
                    goto fail;
                }
                got++;
                len = 0;
            }
            if (c == EOF)
                break;
        }
    }
    if (got != want) {
        fprintf(stderr, "modelpool_predict: the shape needs %zu values, got %zu\n", want, got);
        goto fail;
    }
    return values;
fail:
    free(values);
    return NULL;
}

/* --- request ------------------------------------------------------------------------------- */

static void pack_str(msgpack_packer *pk, const char *s)
{
    size_t len = strlen(s);
    msgpack_pack_str(pk, len); /* str family, never bin (PROTOCOL.md 1) */
    msgpack_pack_str_body(pk, s, len);
}

/* {"inputs": [{"name", "datatype": "FP32", "shape"}], "timeout_ms": N[, "outputs": [{"name"}...]]} */
static void pack_request_header(msgpack_sbuffer *buf, const struct request *req)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, buf, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, req->n_outputs ? 3 : 2);
    pack_str(&pk, "inputs");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 3);
    pack_str(&pk, "name");
    pack_str(&pk, req->input_name);
    pack_str(&pk, "datatype");
    pack_str(&pk, "FP32");
    pack_str(&pk, "shape");
    msgpack_pack_array(&pk, req->ndim);
    for (size_t d = 0; d < req->ndim; d++)
        msgpack_pack_uint64(&pk, req->shape[d]);
    pack_str(&pk, "timeout_ms");
    msgpack_pack_uint64(&pk, (uint64_t)req->timeout_ms);
    if (req->n_outputs) {
        pack_str(&pk, "outputs");
        msgpack_pack_array(&pk, req->n_outputs);
        for (size_t k = 0; k < req->n_outputs; k++) {
            msgpack_pack_map(&pk, 1);
            pack_str(&pk, "name");
            pack_str(&pk, req->outputs[k]);
        }
    }
}

/* Raw little-endian float32 bytes, whatever the host's byte order. */
static unsigned char *encode_fp32(const float *values, size_t count)
{
    unsigned char *out = malloc(count ? count * 4 : 1);
    if (out == NULL)
        return NULL;
    for (size_t k = 0; k < count; k++) {
        uint32_t bits;
        memcpy(&bits, &values[k], 4);
        for (int b = 0; b < 4; b++)
            out[4 * k + (size_t)b] = (unsigned char)(bits >> (8 * b));
    }
    return out;
}

static int send_frames(void *sock, const void *const *data, const size_t *sizes, size_t count)
{
    for (size_t k = 0; k < count; k++) {
        if (zmq_send(sock, data[k], sizes[k], k + 1 < count ? ZMQ_SNDMORE : 0) < 0) {
            fprintf(stderr, "modelpool_predict: send failed: %s\n", zmq_strerror(zmq_errno()));
            return -1;
        }
    }
    return 0;
}

/* --- reply --------------------------------------------------------------------------------- */

static void free_message(struct message *msg)
{
    for (size_t k = 0; k < msg->count; k++)
        free(msg->frames[k].data);
    free(msg->frames);
    msg->frames = NULL;
    msg->count = 0;
}

/* Receive every part of one message, copying each into its own malloc'd (aligned) buffer. */
static int recv_message(void *sock, struct message *msg)
{
    int more = 1;
    msg->frames = NULL;
    msg->count = 0;
    while (more) {
        zmq_msg_t part;
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, sock, 0) < 0) {
            fprintf(stderr, "modelpool_predict: receive failed: %s\n", zmq_strerror(zmq_errno()));
            zmq_msg_close(&part);
            free_message(msg);
            return -1;
        }
        size_t size = zmq_msg_size(&part);
        struct frame *grown = realloc(msg->frames, (msg->count + 1) * sizeof *grown);
        unsigned char *copy = malloc(size ? size : 1);
        if (grown != NULL)
            msg->frames = grown;
        if (grown == NULL || copy == NULL) {
            free(copy);
            zmq_msg_close(&part);
            free_message(msg);
            return -1;
        }
        memcpy(copy, zmq_msg_data(&part), size);
        msg->frames[msg->count].data = copy;
        msg->frames[msg->count].size = size;
        msg->count++;
        more = zmq_msg_more(&part);
        zmq_msg_close(&part);
    }
    return 0;
}

static int frame_is(const struct frame *f, const void *bytes, size_t size)
{
    return f->size == size && (size == 0 || memcmp(f->data, bytes, size) == 0);
}

/* The value for a str key in a msgpack map, or NULL. */
static const msgpack_object *map_get(const msgpack_object *map, const char *key)
{
    size_t len = strlen(key);
    if (map == NULL || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t k = 0; k < map->via.map.size; k++) {
        const msgpack_object *name = &map->via.map.ptr[k].key;
        if (name->type == MSGPACK_OBJECT_STR && name->via.str.size == len &&
            memcmp(name->via.str.ptr, key, len) == 0)
            return &map->via.map.ptr[k].val;
    }
    return NULL;
}

static int str_is(const msgpack_object *o, const char *text)
{
    size_t len = strlen(text);
    return o->type == MSGPACK_OBJECT_STR && o->via.str.size == len && memcmp(o->via.str.ptr, text, len) == 0;
}

static const struct datatype *find_datatype(const msgpack_object *o)
{
    if (o == NULL || o->type != MSGPACK_OBJECT_STR)
        return NULL;
    for (size_t k = 0; k < sizeof DATATYPES / sizeof DATATYPES[0]; k++)
        if (str_is(o, DATATYPES[k].name))
            return &DATATYPES[k];
    return NULL;
}

static uint64_t read_le(const unsigned char *p, size_t size)
{
    uint64_t v = 0;
    for (size_t b = 0; b < size; b++)
        v |= (uint64_t)p[b] << (8 * b);
    return v;
}

/* Two's-complement `size`-byte integer to int64_t, without implementation-defined shifts. */
static int64_t to_signed(uint64_t raw, size_t size)
{
    uint64_t sign = (uint64_t)1 << (8 * size - 1);
    /* -(magnitude - 1) - 1 stays in range even for the most negative value */
    return (raw & sign) ? -(int64_t)(~raw & (sign - 1)) - 1 : (int64_t)raw;
}

static double half_to_double(uint16_t h)
{
    int exponent = (h >> 10) & 0x1f;
    int mantissa = h & 0x3ff;
    double v;
    if (exponent == 0)
        v = ldexp(mantissa, -24);
    else if (exponent == 31)
        v = mantissa ? NAN : INFINITY;
    else
        v = ldexp(mantissa + 1024, exponent - 25);
    return (h & 0x8000) ? -v : v;
}

/* Element `k` of a numeric tensor as a double (for argmax). */
static double element_as_double(const struct datatype *dt, const unsigned char *data, size_t k)
{
    uint64_t raw = read_le(data + k * dt->itemsize, dt->itemsize);
    if (dt->kind == 'f') {
        if (dt->itemsize == 2)
            return half_to_double((uint16_t)raw);
        if (dt->itemsize == 4) {
            uint32_t bits = (uint32_t)raw;
            float f;
            memcpy(&f, &bits, 4);
            return f;
        }
        double d;
        memcpy(&d, &raw, 8);
        return d;
    }
    if (dt->kind == 'i')
        return (double)to_signed(raw, dt->itemsize);
    return (double)raw;
}

static void print_element(const struct datatype *dt, const unsigned char *data, size_t k)
{
    uint64_t raw = read_le(data + k * dt->itemsize, dt->itemsize);
    switch (dt->kind) {
    case 'b':
        printf("%d", raw != 0);
        break;
    case 'u':
        printf("%" PRIu64, raw);
        break;
    case 'i':
        printf("%" PRId64, to_signed(raw, dt->itemsize));
        break;
    default:
        /* enough digits to read the same value back: FP16 5, FP32 9, FP64 17 */
        printf("%.*g", dt->itemsize == 2 ? 5 : dt->itemsize == 4 ? 9 : 17, element_as_double(dt, data, k));
    }
}

static void print_bytes_element(const unsigned char *p, size_t len)
{
    putchar('"');
    for (size_t b = 0; b < len; b++) {
        if (p[b] == '"' || p[b] == '\\')
            printf("\\%c", p[b]);
        else if (isprint(p[b]))
            putchar(p[b]);
        else
            printf("\\x%02x", p[b]);
    }
    putchar('"');
}

static int check_shape(const msgpack_object *shape, uint64_t *dims, size_t *ndim)
{
    if (shape == NULL || shape->type != MSGPACK_OBJECT_ARRAY || shape->via.array.size > MAX_DIMS)
        return -1;
    for (uint32_t d = 0; d < shape->via.array.size; d++) {
        if (shape->via.array.ptr[d].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            return -1; /* negative, float or not a number */
        dims[d] = shape->via.array.ptr[d].via.u64;
    }
    *ndim = shape->via.array.size;
    return 0;
}

/* Print one BYTES tensor after checking its frame holds exactly `count` elements. */
static int print_bytes_tensor(const char *name, const struct frame *f, size_t count, size_t row)
{
    size_t pos = 0;
    for (size_t k = 0; k < count; k++) { /* validate first, print only a well-formed frame */
        if (f->size - pos < 4 || f->size - pos - 4 < read_le(f->data + pos, 4)) {
            fprintf(stderr, "modelpool_predict: output '%s': BYTES frame ends inside element %zu\n", name, k);
            return -1;
        }
        pos += 4 + (size_t)read_le(f->data + pos, 4);
    }
    if (pos != f->size) {
        fprintf(stderr, "modelpool_predict: output '%s': %zu bytes left after the BYTES elements\n", name,
                f->size - pos);
        return -1;
    }
    pos = 0;
    for (size_t k = 0; k < count; k++) {
        size_t len = (size_t)read_le(f->data + pos, 4);
        printf("%s", k % row == 0 ? "  " : " ");
        print_bytes_element(f->data + pos + 4, len);
        if ((k + 1) % row == 0)
            putchar('\n');
        pos += 4 + len;
    }
    return 0;
}

static void print_argmax(const char *name, const struct datatype *dt, const struct frame *f, const uint64_t *dims)
{
    printf("argmax %s", name);
    for (uint64_t r = 0; r < dims[0]; r++) {
        size_t best = 0;
        double best_value = element_as_double(dt, f->data, (size_t)(r * dims[1]));
        for (size_t c = 1; c < dims[1] && !isnan(best_value); c++) {
            double v = element_as_double(dt, f->data, (size_t)(r * dims[1]) + c);
            if (isnan(v) || v > best_value) { /* as numpy: the first maximum, a NaN wins */
                best = c;
                best_value = v;
            }
        }
        printf(" %zu", best);
    }
    putchar('\n');
}

/* Check and print one output tensor: "output NAME DATATYPE [d0, d1]", value rows, argmax if 2-D. */
static int print_tensor(const msgpack_object *meta, const struct frame *f)
{
    const msgpack_object *name_obj = map_get(meta, "name");
    const struct datatype *dt = find_datatype(map_get(meta, "datatype"));
    uint64_t dims[MAX_DIMS];
    size_t ndim, count;
    char name[MAX_ID_BYTES + 1];
    if (name_obj == NULL || name_obj->type != MSGPACK_OBJECT_STR || dt == NULL ||
        check_shape(map_get(meta, "shape"), dims, &ndim) != 0 ||
        element_count(dims, ndim, dt->itemsize ? dt->itemsize : 4, &count) != 0) {
        fputs("modelpool_predict: reply has a malformed output tensor description\n", stderr);
        return -1;
    }
    snprintf(name, sizeof name, "%.*s", (int)(name_obj->via.str.size > MAX_ID_BYTES ? MAX_ID_BYTES
                                                                                     : name_obj->via.str.size),
             name_obj->via.str.ptr);
    if (dt->itemsize && f->size != count * dt->itemsize) {
        fprintf(stderr, "modelpool_predict: output '%s': %s needs %zu bytes, frame has %zu\n", name, dt->name,
                count * dt->itemsize, f->size);
        return -1;
    }
    printf("output %s %s [", name, dt->name);
    for (size_t d = 0; d < ndim; d++)
        printf("%s%" PRIu64, d ? ", " : "", dims[d]);
    printf("]\n");
    size_t row = ndim ? (size_t)dims[ndim - 1] : 1; /* one printed line per innermost row */
    if (row == 0)
        return 0;
    if (dt->kind == 's')
        return print_bytes_tensor(name, f, count, row);
    for (size_t k = 0; k < count; k++) {
        fputs(k % row == 0 ? "  " : " ", stdout);
        print_element(dt, f->data, k);
        if ((k + 1) % row == 0)
            putchar('\n');
    }
    if (ndim == 2)
        print_argmax(name, dt, f, dims);
    return 0;
}

static void print_error(const char *status, const msgpack_object *header)
{
    const msgpack_object *error = map_get(header, "error");
    const msgpack_object *type = map_get(error, "type");
    const msgpack_object *message = map_get(error, "message");
    const char *type_name = "PoolError";
    /* PROTOCOL.md 3.2: a missing, unknown or non-string type is chosen by status */
    for (size_t k = 0; k < sizeof STATUS_TYPES / sizeof STATUS_TYPES[0]; k++)
        if (strcmp(status, STATUS_TYPES[k].status) == 0)
            type_name = STATUS_TYPES[k].type;
    for (size_t k = 0; type != NULL && k < sizeof ERROR_TYPES / sizeof ERROR_TYPES[0]; k++)
        if (str_is(type, ERROR_TYPES[k]))
            type_name = ERROR_TYPES[k];
    fprintf(stderr, "error %s %s: ", status, type_name);
    if (error == NULL || error->type != MSGPACK_OBJECT_MAP)
        fprintf(stderr, "status %s with no error message\n", status);
    else if (message != NULL && message->type == MSGPACK_OBJECT_STR)
        fprintf(stderr, "%.*s\n", (int)message->via.str.size, message->via.str.ptr);
    else
        fputs("\n", stderr);
}

/* Check one reply and print it; returns the process exit status. */
static int handle_reply(const struct message *msg)
{
    const struct frame *f = msg->frames;
    char status[4];
    msgpack_unpacked header;
    size_t offset = 0;
    int rc = 0;
    if (f[4].size != 3 || !isdigit(f[4].data[0]) || !isdigit(f[4].data[1]) || !isdigit(f[4].data[2])) {
        fputs("modelpool_predict: reply status is not three ASCII digits\n", stderr);
        return EXIT_BROKEN;
    }
    memcpy(status, f[4].data, 3);
    status[3] = '\0';
    msgpack_unpacked_init(&header);
    if (msgpack_unpack_next(&header, (const char *)f[5].data, f[5].size, &offset) != MSGPACK_UNPACK_SUCCESS ||
        offset != f[5].size || header.data.type != MSGPACK_OBJECT_MAP) {
        fputs("modelpool_predict: reply header is not a msgpack map\n", stderr);
        rc = EXIT_BROKEN;
    } else if (strcmp(status, "200") != 0) {
        print_error(status, &header.data);
        rc = EXIT_ERROR_STATUS;
    } else {
        const msgpack_object *outputs = map_get(&header.data, "outputs");
        const msgpack_object *model = map_get(&header.data, "model_name");
        const msgpack_object *version = map_get(&header.data, "model_version");
        if (outputs == NULL || outputs->type != MSGPACK_OBJECT_ARRAY || outputs->via.array.size != msg->count - 6) {
            fprintf(stderr, "modelpool_predict: reply lists %u outputs but %zu tensor frames follow\n",
                    outputs && outputs->type == MSGPACK_OBJECT_ARRAY ? outputs->via.array.size : 0u,
                    msg->count - 6);
            rc = EXIT_BROKEN;
        } else {
            if (model != NULL && model->type == MSGPACK_OBJECT_STR)
                printf("model %.*s", (int)model->via.str.size, model->via.str.ptr);
            if (version != NULL && version->type == MSGPACK_OBJECT_STR)
                printf(" version %.*s", (int)version->via.str.size, version->via.str.ptr);
            printf("\n");
            for (uint32_t k = 0; k < outputs->via.array.size && rc == 0; k++)
                if (print_tensor(&outputs->via.array.ptr[k], &f[6 + k]) != 0)
                    rc = EXIT_BROKEN;
        }
    }
    msgpack_unpacked_destroy(&header);
    return rc;
}

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* Wait for the reply to request `rid`, discarding anything else; returns the exit status. */
static int await_reply(void *sock, const unsigned char *rid, size_t rid_len, long wait_ms, const char *endpoint)
{
    long give_up_at = now_ms() + wait_ms;
    for (;;) {
        long left = give_up_at - now_ms();
        zmq_pollitem_t item = {sock, 0, ZMQ_POLLIN, 0};
        int ready = left > 0 ? zmq_poll(&item, 1, left) : 0;
        if (ready < 0) {
            if (zmq_errno() == EINTR)
                continue;
            fprintf(stderr, "modelpool_predict: poll failed: %s\n", zmq_strerror(zmq_errno()));
            return EXIT_BROKEN;
        }
        if (ready == 0) {
            fprintf(stderr, "timeout: no reply from %s within %ld ms\n", endpoint, wait_ms);
            return EXIT_TIMEOUT;
        }
        struct message msg;
        if (recv_message(sock, &msg) != 0)
            return EXIT_BROKEN;
        if (msg.count < 6 || !frame_is(&msg.frames[0], "", 0) ||
            !frame_is(&msg.frames[1], CLIENT_PROTOCOL, strlen(CLIENT_PROTOCOL))) {
            fprintf(stderr, "modelpool_predict: ignoring a malformed reply of %zu frames\n", msg.count);
        } else if (frame_is(&msg.frames[3], rid, rid_len)) {
            int rc = handle_reply(&msg);
            free_message(&msg);
            return rc;
        } /* else: a late reply to some other request; not ours */
        free_message(&msg);
    }
}

int main(int argc, char **argv)
{
    struct request req;
    msgpack_sbuffer header;
    float *values = NULL;
    unsigned char *tensor = NULL;
    void *ctx = NULL, *sock = NULL;
    size_t count;
    int rc = EXIT_BROKEN;
    /* One request per run, so a fixed 32-bit big-endian counter value is unique on the socket. */
    static const unsigned char rid[4] = {0, 0, 0, 1};

    msgpack_sbuffer_init(&header);
    if (parse_args(argc, argv, &req) != 0) {
        rc = EXIT_USAGE;
        goto done;
    }
    if (element_count(req.shape, req.ndim, 4, &count) != 0) {
        fputs("modelpool_predict: the shape is too large\n", stderr);
        rc = EXIT_USAGE;
        goto done;
    }
    values = read_values(&req, count);
    if (values == NULL) {
        rc = EXIT_USAGE;
        goto done;
    }
    tensor = encode_fp32(values, count);
    if (tensor == NULL)
        goto done;
    pack_request_header(&header, &req);

    ctx = zmq_ctx_new();
    sock = ctx ? zmq_socket(ctx, ZMQ_DEALER) : NULL;
    int linger = 0;
    if (sock == NULL || zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_connect(sock, req.endpoint) != 0) {
        fprintf(stderr, "modelpool_predict: cannot connect to %s: %s\n", req.endpoint, zmq_strerror(zmq_errno()));
        goto done;
    }
    const void *data[] = {"", CLIENT_PROTOCOL, req.model, rid, header.data, tensor};
    const size_t sizes[] = {0, strlen(CLIENT_PROTOCOL), strlen(req.model), sizeof rid, header.size, count * 4};
    if (send_frames(sock, data, sizes, 6) != 0)
        goto done;
    rc = await_reply(sock, rid, sizeof rid, req.timeout_ms + RECEIVE_GRACE_MS, req.endpoint);

done:
    if (sock != NULL)
        zmq_close(sock);
    if (ctx != NULL)
        zmq_ctx_term(ctx);
    msgpack_sbuffer_destroy(&header);
    free(tensor);
    free(values);
    free(req.outputs);
    fflush(stdout);
    return rc;
}
