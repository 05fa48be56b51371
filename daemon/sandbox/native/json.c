/* A small JSON reader and writer for the supervisor protocol (see json.h). */
#include "json.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 32

struct parser {
    const char *at, *end;
    const char *error;
    int depth;
};

static void *xrealloc(void *p, size_t size)
{
    void *q = realloc(p, size ? size : 1);
    if (q == NULL)
        abort(); /* PID 1 out of memory: nothing sensible is left to do */
    return q;
}

static void skip_space(struct parser *p)
{
    while (p->at < p->end && (*p->at == ' ' || *p->at == '\t' || *p->at == '\n' || *p->at == '\r'))
        p->at++;
}

static bool fail(struct parser *p, const char *why)
{
    if (p->error == NULL)
        p->error = why;
    return false;
}

static bool literal(struct parser *p, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(p->end - p->at) < n || memcmp(p->at, word, n) != 0)
        return fail(p, "invalid literal");
    p->at += n;
    return true;
}

static int hex4(const char *s)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v |= c - 'A' + 10;
        else
            return -1;
    }
    return v;
}

static void put_utf8(struct buf *b, uint32_t cp)
{
    unsigned char out[4];
    size_t n;
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        n = 1;
    } else if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | (cp >> 6));
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        out[0] = (unsigned char)(0xF0 | (cp >> 18));
        out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    buf_add(b, out, n);
}

/* The length of the valid UTF-8 sequence at s (at most `left` bytes), or 0. */
static size_t utf8_length(const unsigned char *s, size_t left)
{
    uint32_t cp;
    size_t n;
    if (s[0] < 0x80)
        return 1;
    if ((s[0] & 0xE0) == 0xC0) {
        n = 2;
        cp = s[0] & 0x1F;
    } else if ((s[0] & 0xF0) == 0xE0) {
        n = 3;
        cp = s[0] & 0x0F;
    } else if ((s[0] & 0xF8) == 0xF0) {
        n = 4;
        cp = s[0] & 0x07;
    } else {
        return 0;
    }
    if (n > left)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

static bool parse_string(struct parser *p, char **out, size_t *out_len, bool allow_nul)
{
    struct buf b = {0};
    p->at++; /* the opening quote */
    while (p->at < p->end && *p->at != '"') {
        unsigned char c = (unsigned char)*p->at;
        if (c < 0x20) {
            buf_free(&b);
            return fail(p, "control character in a string");
        }
        if (c != '\\') {
            size_t n = utf8_length((const unsigned char *)p->at, (size_t)(p->end - p->at));
            if (n == 0) {
                buf_free(&b);
                return fail(p, "invalid UTF-8 in a string");
            }
            buf_add(&b, p->at, n);
            p->at += n;
            continue;
        }
        if (p->end - p->at < 2) {
            buf_free(&b);
            return fail(p, "unterminated string");
        }
        char e = p->at[1];
        p->at += 2;
        const char *plain = strchr("\"\\/bfnrt", e);
        if (e != '\0' && plain != NULL) {
            static const char decoded[] = "\"\\/\b\f\n\r\t";
            buf_add(&b, &decoded[plain - "\"\\/bfnrt"], 1);
            continue;
        }
        if (e != 'u' || p->end - p->at < 4 || hex4(p->at) < 0) {
            buf_free(&b);
            return fail(p, "invalid escape in a string");
        }
        uint32_t cp = (uint32_t)hex4(p->at);
        p->at += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) { /* a high surrogate: its low half must follow */
            int low = (p->end - p->at >= 6 && p->at[0] == '\\' && p->at[1] == 'u') ?
                          hex4(p->at + 2) : -1;
            if (low < 0xDC00 || low > 0xDFFF) {
                buf_free(&b);
                return fail(p, "lone surrogate in a string");
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + ((uint32_t)low - 0xDC00);
            p->at += 6;
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            buf_free(&b);
            return fail(p, "lone surrogate in a string");
        }
        if (cp == 0 && !allow_nul) { /* a member name: compared as a C string */
            buf_free(&b);
            return fail(p, "NUL in a member name");
        }
        put_utf8(&b, cp);
    }
    if (p->at >= p->end) {
        buf_free(&b);
        return fail(p, "unterminated string");
    }
    p->at++; /* the closing quote */
    buf_add(&b, "", 1);
    *out = b.data;
    *out_len = b.len - 1;
    return true;
}

static bool parse_number(struct parser *p, struct json *v)
{
    const char *start = p->at;
    bool integral = true;
    if (p->at < p->end && *p->at == '-')
        p->at++;
    if (p->at >= p->end)
        return fail(p, "invalid number");
    if (*p->at == '0') {
        p->at++;
    } else if (*p->at >= '1' && *p->at <= '9') {
        while (p->at < p->end && *p->at >= '0' && *p->at <= '9')
            p->at++;
    } else {
        return fail(p, "invalid number");
    }
    if (p->at < p->end && *p->at == '.') {
        integral = false;
        p->at++;
        if (p->at >= p->end || *p->at < '0' || *p->at > '9')
            return fail(p, "invalid number");
        while (p->at < p->end && *p->at >= '0' && *p->at <= '9')
            p->at++;
    }
    if (p->at < p->end && (*p->at == 'e' || *p->at == 'E')) {
        integral = false;
        p->at++;
        if (p->at < p->end && (*p->at == '+' || *p->at == '-'))
            p->at++;
        if (p->at >= p->end || *p->at < '0' || *p->at > '9')
            return fail(p, "invalid number");
        while (p->at < p->end && *p->at >= '0' && *p->at <= '9')
            p->at++;
    }
    size_t n = (size_t)(p->at - start);
    char text[64];
    if (n >= sizeof(text))
        return fail(p, "number too long");
    memcpy(text, start, n);
    text[n] = '\0';
    v->kind = JSON_NUMBER;
    v->number = strtod(text, NULL);
    if (!isfinite(v->number))
        return fail(p, "number out of range");
    if (integral) {
        errno = 0;
        long long i = strtoll(text, NULL, 10);
        if (errno == 0) {
            v->integral = true;
            v->integer = i;
        }
    }
    return true;
}

static bool parse_value(struct parser *p, struct json *v);

static bool parse_container(struct parser *p, struct json *v, bool object)
{
    size_t cap = 0;
    char close = object ? '}' : ']';
    v->kind = object ? JSON_OBJECT : JSON_ARRAY;
    if (++p->depth > MAX_DEPTH)
        return fail(p, "nested too deeply");
    p->at++;
    skip_space(p);
    if (p->at < p->end && *p->at == close) {
        p->at++;
        p->depth--;
        return true;
    }
    for (;;) {
        if (v->count == cap) {
            cap = cap ? cap * 2 : 4;
            v->items = xrealloc(v->items, cap * sizeof(*v->items));
            if (object)
                v->keys = xrealloc(v->keys, cap * sizeof(*v->keys));
        }
        struct json *item = &v->items[v->count];
        memset(item, 0, sizeof(*item));
        if (object) {
            size_t key_len;
            skip_space(p);
            if (p->at >= p->end || *p->at != '"')
                return fail(p, "expected a member name");
            v->keys[v->count] = NULL;
            if (!parse_string(p, &v->keys[v->count], &key_len, false))
                return false;
            v->count++; /* owned from here, freed with the tree on failure */
            skip_space(p);
            if (p->at >= p->end || *p->at != ':')
                return fail(p, "expected ':'");
            p->at++;
            if (!parse_value(p, item))
                return false;
        } else {
            v->count++;
            if (!parse_value(p, item))
                return false;
        }
        skip_space(p);
        if (p->at < p->end && *p->at == ',') {
            p->at++;
            continue;
        }
        if (p->at < p->end && *p->at == close) {
            p->at++;
            p->depth--;
            return true;
        }
        return fail(p, object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static bool parse_value(struct parser *p, struct json *v)
{
    skip_space(p);
    if (p->at >= p->end)
        return fail(p, "unexpected end of input");
    switch (*p->at) {
    case 'n':
        v->kind = JSON_NULL;
        return literal(p, "null");
    case 't':
        v->kind = JSON_BOOL;
        v->boolean = true;
        return literal(p, "true");
    case 'f':
        v->kind = JSON_BOOL;
        return literal(p, "false");
    case '"':
        v->kind = JSON_STRING;
        return parse_string(p, &v->string, &v->length, true);
    case '[':
        return parse_container(p, v, false);
    case '{':
        return parse_container(p, v, true);
    default:
        return parse_number(p, v);
    }
}

static void free_inside(struct json *v)
{
    free(v->string);
    for (size_t i = 0; i < v->count; i++) {
        free_inside(&v->items[i]);
        if (v->keys != NULL)
            free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
}

struct json *json_parse(const char *data, size_t size, const char **error)
{
    struct parser p = {data, data + size, NULL, 0};
    struct json *v = xrealloc(NULL, sizeof(*v));
    memset(v, 0, sizeof(*v));
    bool ok = parse_value(&p, v);
    if (ok) {
        skip_space(&p);
        if (p.at != p.end)
            ok = fail(&p, "extra data after the value");
    }
    if (!ok) {
        *error = p.error;
        json_free(v);
        return NULL;
    }
    return v;
}

void json_free(struct json *value)
{
    if (value == NULL)
        return;
    free_inside(value);
    free(value);
}

const struct json *json_get(const struct json *object, const char *key)
{
    if (object == NULL || object->kind != JSON_OBJECT)
        return NULL;
    /* The last one wins, as in Python's json. */
    for (size_t i = object->count; i-- > 0;)
        if (strcmp(object->keys[i], key) == 0)
            return &object->items[i];
    return NULL;
}

/* -- the writer ----------------------------------------------------------------------------- */

void buf_add(struct buf *b, const void *data, size_t len)
{
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + len)
            cap *= 2;
        b->data = xrealloc(b->data, cap);
        b->cap = cap;
    }
    if (len)
        memcpy(b->data + b->len, data, len);
    b->len += len;
}

void buf_str(struct buf *b, const char *text)
{
    buf_add(b, text, strlen(text));
}

void buf_printf(struct buf *b, const char *format, ...)
{
    char small[256];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(small, sizeof(small), format, args);
    va_end(args);
    if (n < 0)
        return;
    if ((size_t)n < sizeof(small)) {
        buf_add(b, small, (size_t)n);
        return;
    }
    char *big = xrealloc(NULL, (size_t)n + 1);
    va_start(args, format);
    vsnprintf(big, (size_t)n + 1, format, args);
    va_end(args);
    buf_add(b, big, (size_t)n);
    free(big);
}

void buf_json_string(struct buf *b, const char *text, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    buf_add(b, "\"", 1);
    for (size_t i = 0; i < len;) {
        unsigned char c = (unsigned char)text[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            buf_add(b, esc, 2);
        } else if (c < 0x20 || c == 0x7F) {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            buf_add(b, esc, 6);
        } else if (c >= 0x80) {
            size_t n = utf8_length((const unsigned char *)text + i, len - i);
            if (n == 0) { /* not UTF-8: U+FFFD, as Python's errors="replace" */
                buf_str(b, "\\ufffd");
                i++;
                continue;
            }
            buf_add(b, text + i, n);
            i += n;
            continue;
        } else {
            buf_add(b, &text[i], 1);
        }
        i++;
    }
    buf_add(b, "\"", 1);
}

void buf_consume(struct buf *b, size_t len)
{
    if (len >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + len, b->len - len);
    b->len -= len;
}

void buf_free(struct buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

void base64_encode(struct buf *out, const unsigned char *data, size_t len)
{
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)data[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)data[i + 1] << 8;
        if (i + 2 < len)
            v |= data[i + 2];
        char quad[4] = {alphabet[(v >> 18) & 63], alphabet[(v >> 12) & 63],
                        i + 1 < len ? alphabet[(v >> 6) & 63] : '=',
                        i + 2 < len ? alphabet[v & 63] : '='};
        buf_add(out, quad, 4);
    }
}

int base64_decode(struct buf *out, const char *text, size_t len)
{
    uint32_t v = 0;
    size_t n = 0, pads = 0;
    for (size_t i = 0; i < len; i++) {
        const char *at = text[i] ? strchr(alphabet, text[i]) : NULL;
        if (text[i] == '=') {
            pads++;
            continue;
        }
        if (at == NULL)
            continue; /* outside the alphabet: skipped */
        if (pads)
            return -1; /* data after padding */
        v = (v << 6) | (uint32_t)(at - alphabet);
        if (++n % 4 == 0) {
            unsigned char three[3] = {(unsigned char)(v >> 16), (unsigned char)(v >> 8),
                                      (unsigned char)v};
            buf_add(out, three, 3);
            v = 0;
        }
    }
    size_t rest = n % 4;
    if (rest == 1 || (rest && pads < 4 - rest))
        return -1;
    if (rest == 2) {
        unsigned char one = (unsigned char)(v >> 4);
        buf_add(out, &one, 1);
    } else if (rest == 3) {
        unsigned char two[2] = {(unsigned char)(v >> 10), (unsigned char)(v >> 2)};
        buf_add(out, two, 2);
    }
    return 0;
}
