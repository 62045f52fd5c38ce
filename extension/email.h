/*-------------------------------------------------------------------------
 *
 * email.h
 *	  E-mailing payment links: templates, header safety, MIME messages.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_EMAIL_H
#define CRMPAY_EMAIL_H

#include "crmpay.h"

extern char *crmpay_email_render(const char *template, const CrmpayJson *fields,
								 bool html, const char **error);
extern bool crmpay_email_address_ok(const char *address);
extern char *crmpay_email_build(const CrmpayJson *payload, int64 job_id, size_t *len);

#endif							/* CRMPAY_EMAIL_H */
