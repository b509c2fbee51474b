#include "http/h1_body.h"

#include "core/fmt.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

void sl_h1_body_reader_init(struct sl_h1_body_reader *r, enum sl_h1_body kind, uint64_t length)
{
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->remaining = length;
    r->done = kind == SL_H1_BODY_NONE || (kind == SL_H1_BODY_LENGTH && length == 0);
    sl_h1_chunked_init(&r->ch);
}

enum sl_status sl_h1_body_reader_peek(struct sl_h1_body_reader *r, struct sl_buf *in, bool eof,
                                      struct sl_slice *data, enum sl_h1_err *err)
{
    data->ptr = in->data ? sl_buf_head(in) : NULL;
    data->len = 0;
    if (r->pending) {
        data->len = (size_t)r->pending;
        return SL_OK;
    }
    if (r->done)
        return SL_DONE;
    size_t avail = in->data ? sl_buf_len(in) : 0;
    switch (r->kind) {
    case SL_H1_BODY_NONE:
        r->done = true;
        return SL_DONE;
    case SL_H1_BODY_LENGTH:
        if (avail == 0) {
            if (eof) {
                *err = SL_H1_ERR_BAD_CONTENT_LENGTH; /* truncated body */
                return SL_ERROR;
            }
            return SL_AGAIN;
        }
        r->pending = avail < r->remaining ? avail : r->remaining;
        r->remaining -= r->pending;
        data->len = (size_t)r->pending;
        return SL_OK;
    case SL_H1_BODY_UNTIL_CLOSE:
        if (avail == 0) {
            if (eof) {
                r->done = true;
                return SL_DONE;
            }
            return SL_AGAIN;
        }
        r->pending = avail;
        data->len = avail;
        return SL_OK;
    case SL_H1_BODY_CHUNKED:
        while (avail) {
            size_t used = 0;
            struct sl_slice d = {0};
            enum sl_status st = sl_h1_chunked_parse(&r->ch, sl_buf_head(in), avail, &used, &d, err);
            if (st == SL_ERROR)
                return SL_ERROR;
            if (d.len) {
                /* Drop the framing before the data so the data sits at the buffer head. */
                size_t framing = (size_t)(d.ptr - sl_buf_head(in));
                sl_buf_consume(in, framing);
                r->pending = d.len;
                data->ptr = sl_buf_head(in);
                data->len = d.len;
                if (st == SL_DONE)
                    r->done = true; /* cannot happen with data, kept for safety */
                return SL_OK;
            }
            sl_buf_consume(in, used);
            avail = in->data ? sl_buf_len(in) : 0;
            if (st == SL_DONE) {
                r->done = true;
                return SL_DONE;
            }
            if (st == SL_AGAIN)
                break;
        }
        if (eof) {
            *err = SL_H1_ERR_BAD_CHUNK;
            return SL_ERROR;
        }
        return SL_AGAIN;
    }
    return SL_AGAIN;
}

void sl_h1_body_reader_consume(struct sl_h1_body_reader *r, struct sl_buf *in, size_t n)
{
    if (n > r->pending)
        n = (size_t)r->pending;
    r->pending -= n;
    r->total += n;
    sl_buf_consume(in, n);
    if (r->kind == SL_H1_BODY_LENGTH && r->remaining == 0 && r->pending == 0)
        r->done = true;
}

void sl_h1_body_writer_init(struct sl_h1_body_writer *w, enum sl_h1_wmode mode)
{
    memset(w, 0, sizeof *w);
    w->mode = mode;
}

static void set_frame(struct sl_h1_body_writer *w, const char *s, size_t n)
{
    memcpy(w->frame, s, n);
    w->frame_len = (uint8_t)n;
    w->frame_off = 0;
}

int sl_h1_body_writer_write(struct sl_h1_body_writer *w, struct sl_transport *tr,
                            struct sl_buf *head, const char *data, size_t len, bool fin,
                            size_t *data_written, bool *flushed)
{
    *data_written = 0;
    for (;;) {
        struct iovec iov[4];
        int n = 0;
        size_t head_len = head && head->data ? sl_buf_len(head) : 0;
        if (head_len)
            iov[n++] = (struct iovec){sl_buf_head(head), head_len};
        size_t data_n = 0;
        if (w->mode == SL_H1_W_CHUNKED) {
            if (w->frame_off == w->frame_len && w->chunk_left == 0 && !w->crlf_after) {
                if (len > 0) {
                    char line[24];
                    size_t m = sl_fmt_hex(line, len);
                    line[m++] = '\r';
                    line[m++] = '\n';
                    set_frame(w, line, m);
                    w->chunk_left = len;
                    w->crlf_after = true;
                } else if (fin && !w->finished) {
                    set_frame(w, "0\r\n\r\n", 5);
                    w->finished = true;
                }
            }
            if (w->frame_off < w->frame_len)
                iov[n++] =
                    (struct iovec){w->frame + w->frame_off, (size_t)(w->frame_len - w->frame_off)};
            if (w->chunk_left && len) {
                data_n = len < w->chunk_left ? len : (size_t)w->chunk_left;
                iov[n++] = (struct iovec){(void *)data, data_n};
            }
            if (w->crlf_after && data_n == w->chunk_left)
                iov[n++] = (struct iovec){(void *)"\r\n", 2};
        } else if (len) {
            data_n = len;
            iov[n++] = (struct iovec){(void *)data, data_n};
        }
        if (n == 0) {
            *flushed = true;
            return 0;
        }
        size_t wrote = 0, offered = 0;
        for (int i = 0; i < n; i++)
            offered += iov[i].iov_len;
        int rc = sl_transport_writev(tr, iov, n, &wrote);
        if (rc < 0) {
            *flushed = false;
            return rc;
        }
        bool short_write = wrote < offered;
        /* Walk the written count through head, framing, data, trailing CRLF in order. */
        size_t k = wrote < head_len ? wrote : head_len;
        if (k)
            sl_buf_consume(head, k);
        wrote -= k;
        if (w->mode == SL_H1_W_CHUNKED) {
            size_t fpend = (size_t)(w->frame_len - w->frame_off);
            k = wrote < fpend ? wrote : fpend;
            w->frame_off = (uint8_t)(w->frame_off + k);
            wrote -= k;
            k = wrote < data_n ? wrote : data_n;
            w->chunk_left -= k;
            wrote -= k;
            *data_written += k;
            w->written += k;
            data += k;
            len -= k;
            if (w->crlf_after && w->chunk_left == 0) {
                /* The CRLF was offered; keep whatever of it did not go out as framing. */
                size_t c = wrote < 2 ? wrote : 2;
                w->crlf_after = false;
                if (c < 2)
                    set_frame(w, &"\r\n"[c], 2 - c);
            }
        } else {
            *data_written += wrote;
            w->written += wrote;
            data += wrote;
            len -= wrote;
        }
        bool pending = (head && head->data && sl_buf_len(head)) || w->frame_off < w->frame_len ||
                       w->crlf_after || (fin && w->mode == SL_H1_W_CHUNKED && !w->finished);
        if (!pending && len == 0) {
            *flushed = true;
            return 0;
        }
        if (short_write) {
            /* The socket is full: wait for EPOLLOUT rather than ask it again. */
            *flushed = false;
            return -EAGAIN;
        }
        /* The socket took everything offered; offer the rest (the next chunk, or the final
         * framing). */
    }
}
