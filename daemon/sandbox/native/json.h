/* A small JSON reader and writer for the supervisor protocol: one line in, a tree of values
 * out; messages built into a growing buffer. Strict (RFC 8259), bounded in depth, and every
 * allocation is freed with the tree. */
#ifndef SANDBOXD_JSON_H
#define SANDBOXD_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum json_kind { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };

struct json {
    enum json_kind kind;
    bool boolean;
    bool integral; /* a number written without fraction or exponent that fits int64 */
    int64_t integer;
    double number;
    char *string; /* JSON_STRING: UTF-8, NUL-terminated; `length` counts a \u0000 inside */
    size_t length;
    size_t count; /* array items or object members */
    struct json *items;
    char **keys; /* JSON_OBJECT: the member names, parallel to items */
};

/* Parse exactly one value (surrounding whitespace allowed) from data[0..size). NULL on any
 * error, with a reason in *error (a static string). */
struct json *json_parse(const char *data, size_t size, const char **error);
void json_free(struct json *value);
/* The member `key` of an object, or NULL. */
const struct json *json_get(const struct json *object, const char *key);

/* A growing byte buffer. */
struct buf {
    char *data;
    size_t len, cap;
};
void buf_add(struct buf *b, const void *data, size_t len);
void buf_str(struct buf *b, const char *text);
void buf_printf(struct buf *b, const char *format, ...) __attribute__((format(printf, 2, 3)));
void buf_json_string(struct buf *b, const char *text, size_t len);
void buf_consume(struct buf *b, size_t len);
void buf_free(struct buf *b);

/* Base64 (RFC 4648, with padding). decode skips characters outside the alphabet, as
 * Python's b64decode does, and fails (-1) on wrong padding. */
void base64_encode(struct buf *out, const unsigned char *data, size_t len);
int base64_decode(struct buf *out, const char *text, size_t len);

#endif
