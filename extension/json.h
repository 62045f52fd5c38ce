/*-------------------------------------------------------------------------
 *
 * json.h
 *	  A small, non-throwing JSON tree reader (json.c).  Include postgres.h
 *	  (server) or postgres_fe.h (the fuzz harnesses in tests/fuzz) first.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_JSON_H
#define CRMPAY_JSON_H

/* Deepest object/array nesting crmpay_json_parse accepts. */
#define CRMPAY_MAX_JSON_DEPTH 64

typedef enum CrmpayJsonKind
{
	CRMPAY_JSON_NULL,
	CRMPAY_JSON_BOOL,
	CRMPAY_JSON_NUMBER,
	CRMPAY_JSON_STRING,
	CRMPAY_JSON_OBJECT,
	CRMPAY_JSON_ARRAY
} CrmpayJsonKind;

typedef struct CrmpayJson
{
	CrmpayJsonKind kind;
	char	   *text;			/* scalars: de-escaped string, or literal */
	int			count;			/* objects and arrays: members */
	int			capacity;
	char	  **keys;			/* objects only */
	struct CrmpayJson **items;
	struct CrmpayJson *parent;
} CrmpayJson;

extern CrmpayJson *crmpay_json_parse(const char *text, size_t len,
									 const char **error);
extern const CrmpayJson *crmpay_json_member(const CrmpayJson *object,
											const char *key);
extern const CrmpayJson *crmpay_json_path(const CrmpayJson *root,
										  const char *dotted_path);
extern const char *crmpay_json_str(const CrmpayJson *root,
								   const char *dotted_path);
extern bool crmpay_json_int64(const CrmpayJson *root, const char *dotted_path,
							  int64 *out);

#endif							/* CRMPAY_JSON_H */
